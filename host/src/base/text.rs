//! Text a plugin controls, made safe to log, store and show: bounded in bytes and on one line.

/// Longest plugin-supplied message the host keeps (errors, log lines, trap output).
pub const MAX_PLUGIN_TEXT: usize = 4096;

/// `text` cut to at most `max` bytes (at a character boundary, marked with how much was cut)
/// with control characters escaped, so that a newline cannot forge a log line and an escape
/// sequence cannot repaint a terminal.
pub fn bounded(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (i, c) in text.char_indices() {
        let escaped_len = match c {
            '\n' | '\r' | '\t' => 2,
            c if c.is_control() => 8,
            c => c.len_utf8(),
        };
        if out.len() + escaped_len > max {
            out.push_str(&format!(
                "… [{} more bytes cut; limit {max} bytes]",
                text.len() - i
            ));
            return out;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// [`bounded`] at the host's limit for plugin messages.
pub fn plugin_message(text: &str) -> String {
    bounded(text, MAX_PLUGIN_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_cannot_start_a_forged_log_line() {
        let shown = plugin_message("ok\n2026-01-01T00:00:00Z ERROR projection_host: forged");
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.contains("ok\\n2026"), "{shown}");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(plugin_message("a\u{1b}[31mb"), "a\\u{001b}[31mb");
    }

    #[test]
    fn long_text_is_cut_at_the_limit_and_says_so() {
        let long = "é".repeat(10_000);
        let shown = bounded(&long, 100);
        assert!(shown.len() < 160, "{}", shown.len());
        assert!(shown.contains("more bytes cut; limit 100 bytes"), "{shown}");
        assert!(shown.starts_with("éé"));
    }

    #[test]
    fn short_text_is_unchanged() {
        assert_eq!(plugin_message("plain text"), "plain text");
    }
}
