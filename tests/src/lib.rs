//! Integration tests that span several MicroMsg processes: multi-broker federation on loopback
//! and, where a Docker engine is reachable, container networks. The tests live under `tests/`.
