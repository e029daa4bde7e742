//! Sans-IO framing and typed messages of the MicroMsg client-broker protocol.
