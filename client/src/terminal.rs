//! Text from others, made safe to write to a terminal.
//!
//! A message, a group's name, a broker's error text: any of it may hold characters a terminal
//! acts on instead of showing. An escape sequence in a message could recolour the screen,
//! clear it, move the cursor over earlier lines to forge them, or retitle the window; the
//! bidirectional overrides make text read in another order than it is stored. Everything the
//! command line prints and the chat screen draws passes through [`terminal_safe`].

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every character a terminal would act on written as `\uXXXX`: control
/// characters other than line feed and tab (C0, DEL, C1), and the bidirectional embeddings,
/// overrides and isolates. `\uXXXX` is also JSON's escape for the character, so a JSON line
/// stays valid and decodes to the same text.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(acts_on_terminal) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if acts_on_terminal(c) {
            // Every such character is below U+FFFF: four hex digits.
            let _ = write!(shown, "\\u{:04x}", u32::from(c));
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

fn acts_on_terminal(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn what_a_terminal_would_act_on_is_shown_instead() {
        assert_eq!(
            terminal_safe("a \u{1b}[2J b \u{1b}]0;title\u{7} c\rd"),
            "a \\u001b[2J b \\u001b]0;title\\u0007 c\\u000dd"
        );
        // C1 controls (CSI alone is an escape sequence for some terminals), DEL, bidi.
        assert_eq!(
            terminal_safe("\u{9b}31m\u{7f}\u{202e}txt\u{2066}"),
            "\\u009b31m\\u007f\\u202etxt\\u2066"
        );
        // Lines, tabs and ordinary text, in any script, stay as they are, and are not copied.
        let plain = "hello\n\tworld, Grüße, 你好, 👋";
        assert!(matches!(terminal_safe(plain), Cow::Borrowed(s) if s == plain));
    }

    #[test]
    fn a_json_line_stays_valid_and_means_the_same() {
        let text = "x\u{1b}[31m\u{9b}\u{7f}\u{202e}y\\";
        let line = serde_json::json!({ "text": text }).to_string();
        let safe = terminal_safe(&line);
        assert!(!safe.chars().any(acts_on_terminal), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["text"], text);
    }
}
