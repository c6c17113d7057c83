//! The parts of `rialto-loadgen` that tests use too.
//!
//! [`oracle`] reads a dataset's expected values without the push job's code, so that
//! `rialto-loadgen verify` and the integration tests compare what the client returns with the
//! input through a path that does not share the code under test.

pub mod oracle;
pub mod verify;
