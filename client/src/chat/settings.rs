//! `DIR/chat.toml`: the chat screen's settings, each with a default. A file that cannot be
//! read is reported with its line and the defaults are used; the chat never refuses to start
//! over its settings.
//!
//! ```toml
//! colour = true                 # false: no colours (NO_COLOR also turns them off)
//! bell = true                   # ring the terminal bell for a message not in view
//! notify = "notify-send \"MicroMsg\" \"message from $MICROMSG_FROM\""
//!
//! [keys]                        # a key: "ctrl-n", "alt-j", "pageup", "f2", "?" …
//! next = "ctrl-n"               # next conversation (Down also works)
//! previous = "ctrl-p"           # previous conversation (Up also works)
//! scroll_up = "ctrl-u"          # PageUp and the wheel also work
//! scroll_down = "ctrl-d"
//! help = "f1"                   # ? on an empty input line also works
//! ```

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde::Deserialize;

/// The file name in the profile directory.
pub const FILE: &str = "chat.toml";

/// The settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Colours (before `NO_COLOR`).
    pub colour: bool,
    /// Ring the bell for a message not in view.
    pub bell: bool,
    /// The notification command.
    pub notify: Option<String>,
    /// The key bindings.
    pub keys: Keys,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            colour: true,
            bell: true,
            notify: None,
            keys: Keys::default(),
        }
    }
}

/// Keys that can be bound (the fixed ones always work too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Next conversation.
    pub next: Key,
    /// Previous conversation.
    pub previous: Key,
    /// Scroll up.
    pub scroll_up: Key,
    /// Scroll down.
    pub scroll_down: Key,
    /// The help.
    pub help: Key,
}

impl Default for Keys {
    fn default() -> Self {
        Self {
            next: Key::ctrl('n'),
            previous: Key::ctrl('p'),
            scroll_up: Key::ctrl('u'),
            scroll_down: Key::ctrl('d'),
            help: Key {
                code: KeyCode::F(1),
                modifiers: KeyModifiers::NONE,
            },
        }
    }
}

/// One key with its modifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The key.
    pub code: KeyCode,
    /// Ctrl, Alt (Shift is part of the character).
    pub modifiers: KeyModifiers,
}

impl Key {
    fn ctrl(c: char) -> Self {
        Self {
            code: KeyCode::Char(c),
            modifiers: KeyModifiers::CONTROL,
        }
    }

    /// Whether `event` is this key.
    pub fn matches(&self, event: &KeyEvent) -> bool {
        let relevant = event.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT);
        event.code == self.code && relevant == self.modifiers
    }

    /// Reads `ctrl-n`, `alt-j`, `pageup`, `f2`, `?`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut modifiers = KeyModifiers::NONE;
        let mut rest = text.trim();
        loop {
            let lower = rest.to_ascii_lowercase();
            if let Some(r) = lower.strip_prefix("ctrl-") {
                modifiers |= KeyModifiers::CONTROL;
                rest = &rest[rest.len() - r.len()..];
            } else if let Some(r) = lower.strip_prefix("alt-") {
                modifiers |= KeyModifiers::ALT;
                rest = &rest[rest.len() - r.len()..];
            } else {
                break;
            }
        }
        let code = match rest.to_ascii_lowercase().as_str() {
            "pageup" => KeyCode::PageUp,
            "pagedown" => KeyCode::PageDown,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "tab" => KeyCode::Tab,
            "esc" => KeyCode::Esc,
            f if f.len() >= 2 && f.starts_with('f') && f[1..].parse::<u8>().is_ok() => {
                KeyCode::F(f[1..].parse().unwrap_or(1))
            }
            _ => {
                let mut chars = rest.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => KeyCode::Char(c),
                    _ => {
                        return Err(format!(
                            "{text:?} is not a key (say ctrl-n, alt-j, pageup, f2)"
                        ));
                    }
                }
            }
        };
        Ok(Self { code, modifiers })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    colour: Option<bool>,
    bell: Option<bool>,
    notify: Option<String>,
    #[serde(default)]
    keys: KeysFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    next: Option<String>,
    previous: Option<String>,
    scroll_up: Option<String>,
    scroll_down: Option<String>,
    help: Option<String>,
}

/// Reads the settings from `text`; on any error the defaults, and what was wrong (with its
/// line) for the user.
pub fn parse(text: &str) -> (Settings, Option<String>) {
    let file: File = match toml::from_str(text) {
        Ok(file) => file,
        Err(e) => {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
            return (
                Settings::default(),
                Some(format!("{FILE}{at}: {}; using the defaults", e.message())),
            );
        }
    };
    let defaults = Keys::default();
    let key = |given: Option<String>, default: Key| -> Result<Key, String> {
        given.map_or(Ok(default), |k| Key::parse(&k))
    };
    let keys = (|| {
        Ok::<_, String>(Keys {
            next: key(file.keys.next, defaults.next)?,
            previous: key(file.keys.previous, defaults.previous)?,
            scroll_up: key(file.keys.scroll_up, defaults.scroll_up)?,
            scroll_down: key(file.keys.scroll_down, defaults.scroll_down)?,
            help: key(file.keys.help, defaults.help)?,
        })
    })();
    let keys = match keys {
        Ok(keys) => keys,
        Err(e) => {
            return (
                Settings::default(),
                Some(format!("{FILE}, [keys]: {e}; using the defaults")),
            );
        }
    };
    let settings = Settings {
        colour: file.colour.unwrap_or(true),
        bell: file.bell.unwrap_or(true),
        notify: file.notify.filter(|n| !n.trim().is_empty()),
        keys,
    };
    (settings, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_colours_the_notifier_and_keys() {
        let (s, warning) =
            parse("colour = false\nnotify = \"true\"\n[keys]\nnext = \"alt-j\"\nhelp = \"F2\"\n");
        assert_eq!(warning, None);
        assert!(!s.colour && s.bell);
        assert_eq!(s.notify.as_deref(), Some("true"));
        assert_eq!(s.keys.next, Key::parse("alt-j").unwrap_or(Key::ctrl('x')));
        assert_eq!(s.keys.help.code, KeyCode::F(2));
        assert_eq!(s.keys.previous, Keys::default().previous);
        assert_eq!(parse("").0, Settings::default());
    }

    #[test]
    fn a_bad_file_is_reported_with_its_line_and_the_defaults_are_used() {
        let (s, warning) = parse("colour = true\nbell = \"loud\"\n");
        assert_eq!(s, Settings::default());
        let warning = warning.unwrap_or_default();
        assert!(warning.contains("line 2"), "{warning}");
        let (s, warning) = parse("[keys]\nnext = \"hyper-x\"\n");
        assert_eq!(s, Settings::default());
        assert!(warning.unwrap_or_default().contains("hyper-x"));
        let (_, warning) = parse("colour = true\nfrobnicate = 1\n");
        assert!(warning.unwrap_or_default().contains("line 2"));
    }
}
