//! The input line: an editable buffer with a cursor (in characters), word delete, and several
//! lines (Alt-Enter). No I/O; the chat feeds it keys.

/// The text being typed and where the cursor is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Input {
    chars: Vec<char>,
    cursor: usize,
}

impl Input {
    /// The text.
    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    /// The cursor, in characters from the start.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// True when nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Takes the text out, leaving the line empty.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.chars).into_iter().collect()
    }

    /// Replaces the text (cursor at the end).
    pub fn set(&mut self, text: &str) {
        self.chars = text.chars().collect();
        self.cursor = self.chars.len();
    }

    /// Types `c` at the cursor.
    pub fn insert(&mut self, c: char) {
        self.chars.insert(self.cursor, c);
        self.cursor += 1;
    }

    /// Backspace.
    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    /// Delete (the character under the cursor).
    pub fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    /// Cursor left.
    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    /// Cursor right.
    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    /// Home: the start of the current line.
    pub fn home(&mut self) {
        while self.cursor > 0 && self.chars[self.cursor - 1] != '\n' {
            self.cursor -= 1;
        }
    }

    /// End: the end of the current line.
    pub fn end(&mut self) {
        while self.cursor < self.chars.len() && self.chars[self.cursor] != '\n' {
            self.cursor += 1;
        }
    }

    /// Ctrl-W: deletes the word before the cursor (and the spaces after it).
    pub fn delete_word(&mut self) {
        let mut start = self.cursor;
        while start > 0 && self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        self.chars.drain(start..self.cursor);
        self.cursor = start;
    }

    /// The lines of the text, and the cursor's (line, column).
    pub fn lines_and_cursor(&self) -> (Vec<String>, (usize, usize)) {
        let text = self.text();
        let lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
        let before: String = self.chars[..self.cursor].iter().collect();
        let line = before.matches('\n').count();
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
        (lines, (line, column))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> Input {
        let mut input = Input::default();
        for c in text.chars() {
            input.insert(c);
        }
        input
    }

    #[test]
    fn editing_keys_move_and_delete_by_character_and_word() {
        let mut input = typed("hello wörld");
        input.left();
        input.left();
        input.backspace();
        assert_eq!(input.text(), "hello wöld");
        input.home();
        input.delete();
        assert_eq!(input.text(), "ello wöld");
        input.end();
        input.delete_word();
        assert_eq!(input.text(), "ello ");
        input.delete_word();
        assert_eq!((input.text().as_str(), input.cursor()), ("", 0));
    }

    #[test]
    fn several_lines_keep_home_end_and_the_cursor_on_their_line() {
        let mut input = typed("first");
        input.insert('\n');
        for c in "second".chars() {
            input.insert(c);
        }
        input.home();
        assert_eq!(
            input.lines_and_cursor(),
            (vec!["first".into(), "second".into()], (1, 0))
        );
        input.left();
        input.home();
        assert_eq!(input.lines_and_cursor().1, (0, 0));
        input.end();
        assert_eq!(input.lines_and_cursor().1, (0, 5));
        assert_eq!(input.take(), "first\nsecond");
        assert!(input.is_empty());
    }
}
