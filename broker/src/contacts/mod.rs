//! Contact setup: [`pending`] requests waiting for an answer (state) and their [`routing`]
//! (the silent-drop rules, asking the target, handing out the connect token).

pub mod pending;
pub mod routing;
