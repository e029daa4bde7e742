//! An error chain as one line for people: each cause once, no links into a dependency's manual.
//!
//! Errors that wrap another often repeat its text in their own message (`connection to the
//! broker lost: peer closed connection …`) and then list it again as their source, so a plain
//! `{e:#}` prints the same cause twice. rustls also appends a URL of its manual to some
//! messages. [`chain_text`] drops a cause whose text an earlier message already carries, and
//! drops URL segments.

/// The messages of an error chain (outermost first) as one line: `a: b: c`, with causes that
/// an earlier message already says, and `https://…` segments, left out.
pub fn chain_text<I, S>(messages: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut kept: Vec<String> = Vec::new();
    for message in messages {
        let text = without_urls(message.as_ref());
        if text.is_empty() || kept.iter().any(|earlier| earlier.contains(&text)) {
            continue;
        }
        kept.push(text);
    }
    kept.join(": ")
}

/// The chain of an `anyhow::Error` as one line (see [`chain_text`]).
pub fn anyhow_text(error: &anyhow::Error) -> String {
    chain_text(error.chain().map(ToString::to_string))
}

/// The chain of any error (it and its sources) as one line (see [`chain_text`]).
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    chain_text(std::iter::successors(Some(error), |e| e.source()).map(ToString::to_string))
}

/// `message` without its `: https://…` (or `http://`) segments.
fn without_urls(message: &str) -> String {
    message
        .split(": ")
        .filter(|part| !part.starts_with("https://") && !part.starts_with("http://"))
        .collect::<Vec<_>>()
        .join(": ")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_repeated_by_its_wrapper_is_said_once_and_manual_links_go() {
        let url = "https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";
        let inner = format!("peer closed connection without sending TLS close_notify: {url}");
        let outer = format!("connection to the broker lost: {inner}");
        assert_eq!(
            chain_text([outer.as_str(), inner.as_str(), inner.as_str()]),
            "connection to the broker lost: peer closed connection without sending TLS close_notify"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept_in_order() {
        assert_eq!(
            chain_text(["sending to 5550001", "the broker refused", "RATE-LIMITED"]),
            "sending to 5550001: the broker refused: RATE-LIMITED"
        );
    }

    #[test]
    fn an_anyhow_chain_is_one_line() {
        let io = std::io::Error::other("connection reset");
        let e = anyhow::Error::new(io).context("reading the reply: connection reset");
        assert_eq!(anyhow_text(&e), "reading the reply: connection reset");
        let e = anyhow::anyhow!("disk full").context("saving the profile");
        assert_eq!(anyhow_text(&e), "saving the profile: disk full");
    }

    #[test]
    fn a_link_error_is_one_line_without_the_manual_link() {
        let url = "https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";
        let io = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("peer closed connection without sending TLS close_notify: {url}"),
        );
        let e = crate::link::LinkError::Io(io);
        assert_eq!(
            error_text(&e),
            "connection to the broker lost: peer closed connection without sending TLS close_notify"
        );
    }
}
