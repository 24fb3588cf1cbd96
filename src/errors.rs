//! Errors as logs should show them: the whole chain of causes. hyper's
//! errors print only their kind ("http2 error"); the reason (an h2 GOAWAY
//! code, an I/O error) is in their sources.

use std::error::Error;

/// `err` and each of its sources, joined with ": ", repeats left out.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// The h2 error behind a hyper error, if any.
pub fn h2_error(err: &hyper::Error) -> Option<&h2::Error> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let err = Outer(std::io::Error::other("connection reset"));
        assert_eq!(chain(&err), "outer: connection reset");
        let plain = std::io::Error::other("alone");
        assert_eq!(chain(&plain), "alone");
    }
}
