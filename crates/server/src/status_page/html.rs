//! A minimal HTML writer that cannot forget to escape: markup goes in only
//! as `&'static str` (what we wrote ourselves, at compile time), and every
//! runtime value goes through [`escape`]. No template engine, so no build
//! step and no dependency for one page.

use std::fmt::Display;

/// `text` safe in element content and in double- or single-quoted
/// attribute values: the five characters HTML gives meaning there become
/// character references.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An HTML document being written.
#[derive(Debug, Default)]
pub struct Html(String);

impl Html {
    /// Markup written in this crate, never a runtime value.
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    /// A runtime value, escaped.
    pub fn text(&mut self, value: impl Display) -> &mut Self {
        self.0.push_str(&escape(&value.to_string()));
        self
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_content_and_both_attribute_quotes() {
        assert_eq!(escape("plain-cache_1+x"), "plain-cache_1+x");
        assert_eq!(
            escape(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        // Already-escaped text is escaped again, not trusted.
        assert_eq!(escape("&amp;"), "&amp;amp;");
        assert_eq!(escape("ключ:é€"), "ключ:é€");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn text_escapes_and_raw_does_not() {
        let mut html = Html::default();
        html.raw("<p title=\"")
            .text("a\"b")
            .raw("\">")
            .text("<b>")
            .text(42)
            .raw("</p>");
        assert_eq!(html.into_string(), "<p title=\"a&quot;b\">&lt;b&gt;42</p>");
    }
}
