//! The pure cryptographic core of MicroMsg.
