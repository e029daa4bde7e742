//! Drawing the chat screen with ratatui, on any backend (the terminal, or `TestBackend` in the
//! tests). Colours are the 16 basic ones, and none at all with [`Theme::plain`] (`NO_COLOR`).

use jiff::Timestamp;
use jiff::tz::TimeZone;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line as TextLine, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};

use super::model::{Broker, COMMANDS, Chat, Delivery, Line};
use crate::relay::Path;

/// Styles of the screen.
#[derive(Debug, Clone, Copy)]
pub struct Theme {
    colour: bool,
}

impl Theme {
    /// The 16 basic colours.
    pub fn colour() -> Self {
        Self { colour: true }
    }

    /// No colour (`NO_COLOR`): emphasis only.
    pub fn plain() -> Self {
        Self { colour: false }
    }

    fn fg(self, c: Color) -> Style {
        if self.colour {
            Style::default().fg(c)
        } else {
            Style::default()
        }
    }

    fn warning(self) -> Style {
        if self.colour {
            Style::default().fg(Color::White).bg(Color::Red)
        } else {
            Style::default().add_modifier(Modifier::REVERSED)
        }
    }

    fn selected(self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }
}

/// Keys, for the help.
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send (or run a /command)"),
    ("Alt-Enter", "new line in the message"),
    ("Up/Down, Ctrl-P/N, Alt-K/J", "previous / next conversation"),
    (
        "PageUp/PageDown, Ctrl-U/D, wheel",
        "scroll the conversation",
    ),
    ("Left/Right, Home/End", "move in the input"),
    ("Ctrl-W", "delete the word before the cursor"),
    ("Tab", "complete a /command"),
    ("?", "this help (Esc closes it)"),
    ("Ctrl-C, /quit", "leave"),
];

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, chat: &Chat, theme: Theme, tz: &TimeZone) {
    let area = frame.area();
    let (input_lines, _) = chat.input.lines_and_cursor();
    let input_height = (input_lines.len() as u16).clamp(1, 5) + 2;
    let [main, status, input] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(input_height),
    ])
    .areas(area);
    let list_width = (area.width / 4).clamp(16, 30);
    let [list, conversation] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(10)]).areas(main);
    draw_list(frame, chat, theme, list);
    draw_conversation(frame, chat, theme, tz, conversation);
    draw_status(frame, chat, theme, status);
    draw_input(frame, chat, input);
    if let Some(request) = chat.requests.first() {
        let text = vec![
            TextLine::from(safe(&format!("{} asks to become a contact.", request.from))),
            TextLine::from(""),
            TextLine::from("[a] accept   [r] reject   [b] reject and block"),
        ];
        popup(frame, "Contact request", text, theme, 50, 5);
    }
    if let Some(view) = &chat.safety {
        // The keys first: on a small terminal the code is what gets cut.
        let mut text = vec![
            TextLine::from(safe(&format!(
                "Safety number with {}:",
                chat.name_of(&view.peer)
            ))),
            TextLine::from(view.digits.clone()),
            TextLine::from("Compare in person or by phone. [v] mark verified   [Esc] close"),
        ];
        text.extend(view.qr.iter().map(|row| TextLine::from(row.clone())));
        let width = view
            .qr
            .iter()
            .map(|r| r.chars().count())
            .max()
            .unwrap_or(0)
            .max(view.digits.chars().count())
            .max(62) as u16
            + 4;
        let height = text.len() as u16 + 2;
        popup(frame, "Safety number", text, theme, width, height);
    }
    if let Some((title, lines)) = &chat.info {
        let text: Vec<TextLine<'_>> = lines.iter().map(|l| TextLine::from(safe(l))).collect();
        let width = lines
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(20)
            .max(title.chars().count()) as u16
            + 4;
        let height = text.len() as u16 + 2;
        popup(frame, title, text, theme, width, height);
    }
    if chat.help {
        let mut text: Vec<TextLine<'_>> = KEYS
            .iter()
            .map(|(k, what)| TextLine::from(format!("{k:<34} {what}")))
            .collect();
        text.push(TextLine::from(""));
        text.extend(
            COMMANDS
                .iter()
                .map(|(c, what)| TextLine::from(format!("{c:<34} {what}"))),
        );
        let height = text.len() as u16 + 2;
        popup(frame, "Help (Esc closes)", text, theme, 78, height);
    }
}

fn draw_list(frame: &mut Frame<'_>, chat: &Chat, theme: Theme, area: Rect) {
    let items: Vec<ListItem<'_>> = chat
        .conversations
        .iter()
        .map(|c| {
            let mark = match c.live {
                _ if c.group => Span::styled("# ", theme.fg(Color::Cyan)),
                Some(Path::Direct) => Span::styled("● ", theme.fg(Color::Green)),
                Some(Path::Relay) => Span::styled("◐ ", theme.fg(Color::Yellow)),
                None => Span::raw("○ "),
            };
            let mut spans = vec![mark, Span::raw(safe(c.title()))];
            if c.unread > 0 {
                spans.push(Span::styled(
                    format!(" ({})", c.unread),
                    theme.fg(Color::Cyan).add_modifier(Modifier::BOLD),
                ));
            }
            if c.blocked {
                spans.push(Span::raw(" [blocked]"));
            }
            if c.key_changed {
                spans.push(Span::styled(" !", theme.fg(Color::Red)));
            } else if c.verified {
                spans.push(Span::styled(" ✓", theme.fg(Color::Green)));
            }
            ListItem::new(TextLine::from(spans))
        })
        .collect();
    let list = List::new(items)
        .block(Block::default().borders(Borders::ALL).title("Contacts"))
        .highlight_style(theme.selected());
    let mut state = ListState::default();
    if !chat.conversations.is_empty() {
        state.select(Some(chat.selected));
    }
    frame.render_stateful_widget(list, area, &mut state);
}

/// Text from others as the screen may draw it: what a terminal would act on is escaped
/// ([`crate::terminal::terminal_safe`]); a message's escape sequence must not clear or
/// repaint the screen.
fn safe(text: &str) -> String {
    crate::terminal::terminal_safe(text).into_owned()
}

fn delivery_text(d: &Delivery) -> String {
    match d {
        Delivery::Received => String::new(),
        Delivery::Sending => " …".into(),
        Delivery::Live => " ✓".into(),
        Delivery::Deposited => " ✓ deposited".into(),
        Delivery::Queued(why) => format!(" ⧗ queued: {}", safe(why)),
        Delivery::Failed(why) => format!(" ✗ failed: {}", safe(why)),
    }
}

fn clock(time: u64, tz: &TimeZone) -> String {
    i64::try_from(time)
        .ok()
        .and_then(|t| Timestamp::from_second(t).ok())
        .map_or_else(
            || "--:--".to_owned(),
            |t| t.to_zoned(tz.clone()).strftime("%H:%M").to_string(),
        )
}

fn message_line<'a>(
    chat: &'a Chat,
    title: &'a str,
    line: &'a Line,
    theme: Theme,
    tz: &TimeZone,
) -> TextLine<'a> {
    let who = match &line.sender {
        _ if line.from_me => "me",
        Some(number) => chat.name_of(number),
        None => title,
    };
    let when = if line.time == 0 {
        "--:--".to_owned()
    } else {
        clock(line.time, tz)
    };
    let who_style = if line.from_me {
        theme.fg(Color::Blue)
    } else {
        theme.fg(Color::Magenta)
    };
    let state_style = match line.delivery {
        Delivery::Failed(_) => theme.fg(Color::Red),
        Delivery::Queued(_) => theme.fg(Color::Yellow),
        _ => theme.fg(Color::DarkGray),
    };
    TextLine::from(vec![
        Span::styled(format!("{when} "), theme.fg(Color::DarkGray)),
        Span::styled(
            format!("{}: ", safe(who)),
            who_style.add_modifier(Modifier::BOLD),
        ),
        Span::raw(safe(&line.text.replace('\n', " ⏎ "))),
        Span::styled(delivery_text(&line.delivery), state_style),
    ])
}

fn draw_conversation(frame: &mut Frame<'_>, chat: &Chat, theme: Theme, tz: &TimeZone, area: Rect) {
    let Some(c) = chat.current() else {
        let hint =
            Paragraph::new("No conversations yet. Type /add NUMBER to ask someone; ? for help.")
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL).title("Conversation"));
        frame.render_widget(hint, area);
        return;
    };
    let path = match c.live {
        _ if c.group => "group",
        Some(Path::Direct) => "online, direct",
        Some(Path::Relay) => "online, relayed",
        None => "offline",
    };
    let title = safe(&if c.group {
        format!("# {} · group", c.title())
    } else if c.name.is_some() {
        format!("{} ({}) · {path}", c.title(), c.peer)
    } else {
        format!("{} · {path}", c.peer)
    });
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [banner, body] = if c.key_changed {
        Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(inner)
    } else {
        [Rect::default(), inner]
    };
    if c.key_changed {
        frame.render_widget(
            Paragraph::new(" ⚠ identity key CHANGED: check /safety; /send! sends anyway ")
                .style(theme.warning()),
            banner,
        );
    }
    // Only the lines that can show: the last `height` above the scroll position (a message
    // wider than the pane wraps, so this may keep a little more than fits).
    let height = body.height as usize;
    let end = c.lines.len().saturating_sub(c.scroll);
    let start = end.saturating_sub(height);
    let lines: Vec<TextLine<'_>> = c.lines[start..end]
        .iter()
        .map(|l| message_line(chat, c.title(), l, theme, tz))
        .collect();
    // Bottom-aligned: wrap, then show the last rows.
    let paragraph = Paragraph::new(lines).wrap(Wrap { trim: false });
    let rows = paragraph.line_count(body.width) as u16;
    let skip = rows.saturating_sub(body.height);
    frame.render_widget(paragraph.scroll((skip, 0)), body);
}

fn draw_status(frame: &mut Frame<'_>, chat: &Chat, theme: Theme, area: Rect) {
    let broker = match chat.broker {
        Broker::Connected => Span::styled("connected", theme.fg(Color::Green)),
        Broker::Reconnecting(secs) => {
            Span::styled(format!("reconnecting in {secs} s"), theme.fg(Color::Yellow))
        }
    };
    let mut spans = vec![
        Span::raw(" broker: "),
        broker,
        Span::raw(format!(
            " │ {} device {} │ outbox {}",
            chat.number, chat.device, chat.outbox
        )),
    ];
    if let Some(status) = &chat.status {
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(safe(status), theme.fg(Color::Cyan)));
    }
    frame.render_widget(
        Paragraph::new(TextLine::from(spans)).style(theme.selected()),
        area,
    );
}

fn draw_input(frame: &mut Frame<'_>, chat: &Chat, area: Rect) {
    let (lines, (row, column)) = chat.input.lines_and_cursor();
    let block = Block::default()
        .borders(Borders::ALL)
        .title("Message (Enter sends, Alt-Enter new line, ? help)");
    let inner = block.inner(area);
    let first = row.saturating_sub(inner.height.saturating_sub(1) as usize);
    let shown: Vec<TextLine<'_>> = lines.into_iter().skip(first).map(TextLine::from).collect();
    frame.render_widget(Paragraph::new(shown).block(block), area);
    let x = inner.x + (column as u16).min(inner.width.saturating_sub(1));
    let y = inner.y + (row - first) as u16;
    frame.set_cursor_position((x, y));
}

fn popup(
    frame: &mut Frame<'_>,
    title: &str,
    text: Vec<TextLine<'_>>,
    theme: Theme,
    width: u16,
    height: u16,
) {
    let area = frame.area();
    let w = width.min(area.width);
    let h = height.min(area.height);
    let rect = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    frame.render_widget(Clear, rect);
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title.to_owned())
        .border_style(theme.fg(Color::Cyan));
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: false }).block(block),
        rect,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ratatui::backend::TestBackend;

    use super::*;
    use crate::agent::Notice;
    use crate::chat::model::{Conversation, Line, Request};

    fn screen(chat: &Chat, width: u16, height: u16, theme: Theme) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|f| draw(f, chat, theme, &TimeZone::UTC))
            .unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    use ratatui::Terminal;

    fn line(time: u64, from_me: bool, text: &str, delivery: Delivery) -> Line {
        Line {
            time,
            from_me,
            text: text.into(),
            delivery,
            queued_id: None,
            sender: None,
        }
    }

    fn sample() -> Chat {
        let mut chat = Chat::new("5550001".into(), 1);
        chat.conversations = vec![
            Conversation {
                peer: "5550002".into(),
                name: Some("Bob".into()),
                live: Some(Path::Relay),
                lines: vec![
                    line(3_600, false, "hi there", Delivery::Received),
                    line(3_660, true, "live one", Delivery::Live),
                    line(3_720, true, "to the inbox", Delivery::Deposited),
                    line(
                        3_780,
                        true,
                        "waiting",
                        Delivery::Queued("broker down".into()),
                    ),
                    line(
                        3_840,
                        true,
                        "lost",
                        Delivery::Failed("not a contact".into()),
                    ),
                ],
                ..Conversation::default()
            },
            Conversation {
                peer: "5550003".into(),
                unread: 4,
                ..Conversation::default()
            },
        ];
        chat
    }

    #[test]
    fn the_list_shows_unread_counts_and_the_conversation_each_delivery_state_at_80x24() {
        let text = screen(&sample(), 80, 24, Theme::colour());
        assert!(text.contains("◐ Bob"), "{text}");
        assert!(text.contains("○ 5550003 (4)"), "{text}");
        assert!(text.contains("Bob (5550002) · online, relayed"), "{text}");
        assert!(text.contains("01:00 Bob: hi there"), "{text}");
        assert!(text.contains("01:01 me: live one ✓"), "{text}");
        assert!(text.contains("to the inbox ✓ deposited"), "{text}");
        assert!(text.contains("waiting ⧗ queued: broker down"), "{text}");
        assert!(text.contains("lost ✗ failed: not a contact"), "{text}");
        assert!(
            text.contains("broker: connected │ 5550001 device 1 │ outbox 0"),
            "{text}"
        );
    }

    #[test]
    fn the_request_prompt_the_help_and_the_key_change_banner_show() {
        let mut chat = sample();
        chat.requests.push(Request {
            from: "5550009".into(),
            request: "ab".into(),
        });
        let text = screen(&chat, 80, 24, Theme::colour());
        assert!(text.contains("5550009 asks to become a contact."), "{text}");
        assert!(text.contains("[a] accept"), "{text}");
        chat.requests.clear();
        chat.help = true;
        let text = screen(&chat, 100, 30, Theme::plain());
        assert!(text.contains("Help (Esc closes)"), "{text}");
        assert!(text.contains("/add NUMBER"), "{text}");
        assert!(text.contains("Alt-Enter"), "{text}");
        chat.help = false;
        chat.on_notice(
            &Notice::IdentityChanged {
                peer: "5550002".into(),
                pinned: "aa".into(),
                presented: "bb".into(),
            },
            0,
        );
        let text = screen(&chat, 80, 24, Theme::plain());
        assert!(text.contains("identity key CHANGED"), "{text}");
        assert!(text.contains("Bob !"), "{text}");
    }

    #[test]
    fn a_group_shows_its_mark_and_each_sender_by_name() {
        let mut chat = sample();
        chat.names.insert("5550002".into(), "Bob".into());
        chat.add_group("ab12", "friends");
        chat.on_notice(
            &Notice::GroupMessage {
                group: "ab12".into(),
                name: "friends".into(),
                from: "5550002".into(),
                text: "hello group".into(),
                time: 3_600,
                offline: false,
            },
            0,
        );
        chat.selected = 2;
        let text = screen(&chat, 80, 24, Theme::colour());
        assert!(text.contains("# friends"), "{text}");
        assert!(text.contains("# friends · group"), "{text}");
        assert!(text.contains("01:00 Bob: hello group"), "{text}");
    }

    #[test]
    fn escape_sequences_from_others_are_shown_not_obeyed() {
        let mut chat = sample();
        let name = "\u{1b}]0;pwned\u{7}friends";
        chat.add_group("ab12", name);
        chat.on_notice(
            &Notice::GroupMessage {
                group: "ab12".into(),
                name: name.into(),
                from: "5550002".into(),
                text: "wipe\u{1b}[2J\u{202e}txet".into(),
                time: 3_600,
                offline: false,
            },
            0,
        );
        chat.selected = 2;
        let text = screen(&chat, 100, 24, Theme::colour());
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("wipe\\u001b[2J\\u202etxet"), "{text}");
        assert!(text.contains("\\u001b]0;pwned\\u0007friends"), "{text}");
    }

    #[test]
    fn the_safety_view_shows_the_digits_the_qr_code_and_the_verified_mark() {
        let mut chat = sample();
        let digits = "12345 67890 12345 67890 12345 67890 12345 67890 12345 67890 12345 67890";
        chat.safety = Some(crate::chat::model::SafetyView {
            peer: "5550002".into(),
            digits: digits.into(),
            qr: crate::chat::qr_rows(digits),
        });
        assert!(chat.safety.as_ref().unwrap().qr.len() > 10);
        let text = screen(&chat, 100, 40, Theme::colour());
        assert!(text.contains(digits), "{text}");
        assert!(
            text.contains("▀") || text.contains("▄"),
            "no QR code:\n{text}"
        );
        assert!(text.contains("[v] mark verified"), "{text}");
        chat.safety = None;
        chat.on_verified("5550002");
        let text = screen(&chat, 80, 24, Theme::colour());
        assert!(text.contains("◐ Bob ✓"), "{text}");
    }

    #[test]
    fn any_size_draws_without_a_panic_and_shows_the_newest_messages() {
        let mut chat = sample();
        for i in 0..500 {
            chat.conversations[0].lines.push(line(
                7_200 + i,
                false,
                &format!("message {i}"),
                Delivery::Received,
            ));
        }
        chat.broker = Broker::Reconnecting(7);
        for (w, h) in [(80, 24), (200, 60), (40, 10), (10, 4), (1, 1)] {
            let text = screen(&chat, w, h, Theme::colour());
            if (w, h) == (80, 24) || (w, h) == (200, 60) {
                assert!(text.contains("message 499"), "{w}x{h}:\n{text}");
                assert!(text.contains("reconnecting in 7 s"), "{w}x{h}:\n{text}");
            }
        }
    }
}
