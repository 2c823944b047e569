//! HTML reduced to readable text: block elements become line breaks, list
//! items dashes, links keep their target, entities are decoded, and what is
//! never shown (head, style, script, comments) is dropped. Lenient about
//! broken markup; linear in the input.

use mail_parser::decoders::html::add_html_token;

/// Elements whose content is never shown.
const HIDDEN: [&str; 6] = ["head", "style", "script", "title", "template", "noscript"];
/// Elements that stand apart from the text around them by a blank line.
const PARAGRAPH: [&str; 16] = [
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "table",
    "blockquote",
    "pre",
    "hr",
    "dl",
    "form",
    "center",
];
/// Elements that start on a line of their own.
const LINE: [&str; 14] = [
    "div", "tr", "li", "dt", "dd", "section", "article", "header", "footer", "address", "main",
    "nav", "figure", "caption",
];

struct Out {
    text: String,
    /// Line breaks owed before the next text (0, 1 or 2).
    breaks: u8,
    space: bool,
}

impl Out {
    fn push_text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            if self.breaks > 0 {
                let trimmed = self.text.trim_end_matches([' ', '\t']).len();
                self.text.truncate(trimmed);
                let have = self.text.len() - self.text.trim_end_matches('\n').len();
                for _ in have..usize::from(self.breaks) {
                    self.text.push('\n');
                }
            } else if self.space && !self.text.ends_with([' ', '\n']) {
                self.text.push(' ');
            }
        }
        self.breaks = 0;
        self.space = false;
        self.text.push_str(s);
    }

    fn line_break(&mut self, n: u8) {
        self.breaks = self.breaks.max(n);
    }
}

/// The text of an HTML document.
pub(crate) fn html_to_text(html: &str) -> String {
    let mut out = Out {
        text: String::with_capacity(html.len() / 2),
        breaks: 0,
        space: false,
    };
    let bytes = html.as_bytes();
    let mut pre = 0usize;
    let mut link: Option<(String, usize)> = None;
    let mut i = 0;
    let mut text_start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' if bytes
                .get(i + 1)
                .is_some_and(|b| b.is_ascii_alphabetic() || matches!(b, b'/' | b'!' | b'?')) =>
            {
                emit_text(&mut out, &html[text_start..i], pre > 0);
                if html[i..].starts_with("<!--") {
                    i = html[i + 4..]
                        .find("-->")
                        .map_or(bytes.len(), |p| i + 4 + p + 3);
                    text_start = i;
                    continue;
                }
                let end = tag_end(bytes, i + 1);
                let tag = &html[i + 1..end.min(bytes.len())];
                i = (end + 1).min(bytes.len());
                let (closing, name, attrs) = split_tag(tag);
                if !closing && HIDDEN.contains(&name.as_str()) {
                    i = skip_element(html, i, &name);
                } else if name == "br" {
                    if !out.text.is_empty() {
                        let trimmed = out.text.trim_end_matches([' ', '\t']).len();
                        out.text.truncate(trimmed);
                        out.text.push('\n');
                    }
                    out.space = false;
                } else if PARAGRAPH.contains(&name.as_str()) {
                    out.line_break(2);
                    if name == "pre" {
                        pre = if closing {
                            pre.saturating_sub(1)
                        } else {
                            pre + 1
                        };
                    }
                } else if LINE.contains(&name.as_str()) {
                    out.line_break(1);
                    if name == "li" && !closing {
                        out.push_text("- ");
                    }
                } else if name == "td" || name == "th" {
                    out.space = true;
                } else if name == "a" {
                    if closing {
                        if let Some((href, at)) = link.take() {
                            let shown = out.text.get(at..).unwrap_or_default().trim().to_owned();
                            let bare = href.strip_prefix("mailto:").unwrap_or(&href);
                            if !shown.is_empty() && shown != bare && shown != href {
                                out.text.push_str(&format!(" ({href})"));
                            } else if shown.is_empty() {
                                out.push_text(&href);
                            }
                        }
                    } else {
                        link = attribute(attrs, "href")
                            .filter(|h| {
                                ["http://", "https://", "mailto:"].iter().any(|p| {
                                    h.len() > p.len()
                                        && h.get(..p.len())
                                            .is_some_and(|s| s.eq_ignore_ascii_case(p))
                                })
                            })
                            .map(|h| (h, out.text.len()));
                    }
                } else if name == "img"
                    && let Some(alt) = attribute(attrs, "alt").filter(|a| !a.trim().is_empty())
                {
                    out.space = true;
                    out.push_text(&format!("[{}]", alt.trim()));
                }
                text_start = i;
            }
            _ => i += 1,
        }
    }
    emit_text(&mut out, &html[text_start.min(bytes.len())..], pre > 0);
    let mut text = String::with_capacity(out.text.len());
    for line in out.text.lines() {
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.trim().to_owned()
}

/// Text between tags: entities decoded, white space collapsed outside
/// `<pre>`.
fn emit_text(out: &mut Out, s: &str, pre: bool) {
    if s.is_empty() {
        return;
    }
    let decoded = decode_entities(s);
    if pre {
        out.push_text(&decoded.replace("\r\n", "\n"));
        return;
    }
    let starts_space = decoded.starts_with(|c: char| c.is_whitespace() && c != '\u{a0}');
    let ends_space = decoded.ends_with(|c: char| c.is_whitespace() && c != '\u{a0}');
    let words: Vec<&str> = decoded
        .split(|c: char| c.is_whitespace() && c != '\u{a0}')
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        out.space |= starts_space || ends_space;
        return;
    }
    if starts_space {
        out.space = true;
    }
    let joined = words.join(" ").replace('\u{a0}', " ");
    out.push_text(&joined);
    out.space = ends_space;
}

fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let end = after
            .char_indices()
            .skip(1)
            .take(40)
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '#'))
            .filter(|&(_, c)| c == ';')
            .map(|(p, _)| p);
        match end {
            Some(end) if end > 1 => {
                add_html_token(&mut out, &after.as_bytes()[..=end], false);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The index of the `>` closing a tag that starts at `from`, quotes
/// respected; the input's end when there is none.
fn tag_end(bytes: &[u8], from: usize) -> usize {
    let mut quote = None;
    let mut i = from;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return i,
            None => {}
        }
        i += 1;
    }
    bytes.len()
}

/// `(closing, lowercase name, attributes)` of a tag's inside.
fn split_tag(tag: &str) -> (bool, String, &str) {
    let (closing, tag) = match tag.strip_prefix('/') {
        Some(t) => (true, t),
        None => (false, tag),
    };
    let name_end = tag
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(tag.len());
    (
        closing,
        tag[..name_end].to_ascii_lowercase(),
        &tag[name_end..],
    )
}

/// The value of attribute `name`, entities decoded.
fn attribute(attrs: &str, name: &str) -> Option<String> {
    let lower = attrs.to_ascii_lowercase();
    let mut from = 0;
    while let Some(p) = lower[from..].find(name) {
        let at = from + p;
        from = at + name.len();
        let before_ok = at == 0 || lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_at = attrs.len() - rest.len() + 1;
        let value = attrs[value_at..].trim_start();
        let v = match value.as_bytes().first() {
            Some(q @ (b'"' | b'\'')) => {
                let inner = &value[1..];
                &inner[..inner.find(*q as char).unwrap_or(inner.len())]
            }
            _ => &value[..value.find(char::is_whitespace).unwrap_or(value.len())],
        };
        return Some(decode_entities(v.trim()));
    }
    None
}

/// Skips past `</name>`; the input's end when it never closes. Scans only
/// what it skips, so the whole reduction stays linear.
fn skip_element(html: &str, from: usize, name: &str) -> usize {
    let bytes = html.as_bytes();
    let mut i = from;
    while i + 1 < bytes.len() {
        if bytes[i] == b'<' && bytes[i + 1] == b'/' {
            let start = i + 2;
            let end = start + name.len();
            if bytes
                .get(start..end)
                .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            {
                return (tag_end(bytes, end) + 1).min(bytes.len());
            }
        }
        i += 1;
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::html_to_text;

    #[test]
    fn reduces_structure_to_lines() {
        let html = "<html><head><title>t</title><style>p{}</style></head><body>\
            <h1>Hi&nbsp;there</h1><p>Price &lt;= &euro;80 &amp; more&#33;</p>\
            <ul><li>one</li><li>two</li></ul><p>a<br>b<br><br>c</p>\
            <!-- hidden --><script>alert(1)</script>\
            <p>Order <a href=\"https://x.example/o/1\">1044</a> or \
            <a href='mailto:help@x.example'>help@x.example</a></p></body></html>";
        assert_eq!(
            html_to_text(html),
            "Hi there\n\nPrice <= €80 & more!\n\n- one\n- two\n\na\nb\n\nc\n\n\
             Order 1044 (https://x.example/o/1) or help@x.example"
        );
    }

    #[test]
    fn survives_broken_markup() {
        for html in [
            "<",
            "<p",
            "<a href=\"x",
            "<!--",
            "&",
            "&#xffffffff;",
            "&#;",
            "<script>never closed",
            "a < b > c",
            "<p>é&eacute;</p><",
            "<a href=>x</a></a></a>",
            "<pre>  keep\n   this</pre>",
            "<style>a</STYLE >b",
            "<style>a</sty",
            "<a href=\"ht\u{fffd}p://x\">y</a>",
        ] {
            let _ = html_to_text(html);
        }
        assert_eq!(html_to_text("a < b > c"), "a < b > c");
        assert_eq!(html_to_text("<style>a</STYLE >b"), "b");
        assert_eq!(html_to_text("<style>a</sty"), "");
        assert_eq!(html_to_text("<pre>  keep\n   this</pre>"), "keep\n   this");
    }
}
