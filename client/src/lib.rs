//! The MicroMsg client library.
