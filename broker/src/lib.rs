//! The MicroMsg broker.
