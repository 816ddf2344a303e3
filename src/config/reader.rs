//! Typed reading of a spanned TOML table.
//!
//! Every value is taken out of its table by key, so what is left at the end
//! is unknown and reported with its line. Every error names the file, the
//! line, the section (`pool "app"`) and the key.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// The longest duration any key takes (30 days): far beyond any sensible
/// timeout, and far from overflowing a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The source being read, to turn byte offsets into lines.
#[derive(Clone, Copy)]
pub(super) struct Source<'s> {
    pub path: &'s Path,
    pub text: &'s str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let mut end = offset.min(self.text.len());
        if end == self.text.len() && self.text.ends_with('\n') {
            // The end of a file that ends with a newline is on its last
            // line, not on a line after it.
            end -= 1;
        }
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error at `span`, in `context`.
    pub fn error(&self, span: &Range<usize>, context: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span.start),
            context: context.to_string(),
            message,
        }
    }
}

/// A table being read. Keys are removed as they are read.
pub(super) struct Table<'s> {
    src: Source<'s>,
    entries: DeTable<'s>,
    span: Range<usize>,
    /// Where this table sits, for messages: `pool "app"`, `listener "public"`.
    context: String,
}

/// A value and where it stands.
pub(super) struct Value<T> {
    pub value: T,
    pub span: Range<usize>,
}

fn kind(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'s> Table<'s> {
    pub fn root(src: Source<'s>, doc: Spanned<DeTable<'s>>) -> Self {
        let span = doc.span();
        Self {
            src,
            entries: doc.into_inner(),
            span,
            context: String::new(),
        }
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// Names this table in later messages, e.g. `pool "app"`.
    pub fn set_context(&mut self, context: String) {
        self.context = context;
    }

    /// `relative` resolved against the config file's folder.
    pub fn path_near_config(&self, relative: &str) -> std::path::PathBuf {
        self.src
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join(relative)
    }

    /// An error about the table itself (e.g. a missing key).
    pub fn error_here(&self, message: String) -> ConfigError {
        self.src.error(&self.span, &self.context, message)
    }

    /// An error about a value of this table.
    pub fn error_at(&self, span: &Range<usize>, key: &str, message: String) -> ConfigError {
        self.src
            .error(span, &self.context, format!("key \"{key}\": {message}"))
    }

    /// Whether the table has `key` (not yet read).
    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn take(&mut self, key: &str) -> Option<Spanned<DeValue<'s>>> {
        self.entries.remove(key)
    }

    fn wrong_type(&self, key: &str, v: &Spanned<DeValue<'_>>, want: &str) -> ConfigError {
        self.error_at(
            &v.span(),
            key,
            format!("expected {want}, found {}", kind(v.get_ref())),
        )
    }

    pub fn string(&mut self, key: &str) -> Result<Option<Value<String>>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        match v.get_ref() {
            DeValue::String(s) => Ok(Some(Value {
                value: s.to_string(),
                span: v.span(),
            })),
            _ => Err(self.wrong_type(key, &v, "a string")),
        }
    }

    /// An array of strings.
    pub fn strings(&mut self, key: &str) -> Result<Option<Value<Vec<String>>>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        let items = match v.get_ref() {
            DeValue::Array(items) => items,
            // One string stands for a list of one.
            DeValue::String(s) => {
                return Ok(Some(Value {
                    value: vec![s.to_string()],
                    span: v.span(),
                }));
            }
            _ => return Err(self.wrong_type(key, &v, "an array of strings")),
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(s.to_string()),
                _ => return Err(self.wrong_type(key, item, "a string")),
            }
        }
        Ok(Some(Value {
            value: out,
            span: v.span(),
        }))
    }

    pub fn required_string(&mut self, key: &str) -> Result<Value<String>, ConfigError> {
        self.string(key)?
            .ok_or_else(|| self.error_here(format!("missing key \"{key}\"")))
    }

    pub fn boolean(&mut self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(default);
        };
        match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.wrong_type(key, &v, "true or false")),
        }
    }

    /// An integer in `min..=max`.
    pub fn integer(
        &mut self,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(default);
        };
        let DeValue::Integer(i) = v.get_ref() else {
            return Err(self.wrong_type(key, &v, "an integer"));
        };
        let digits = i.as_str().replace('_', "");
        match u64::from_str_radix(digits.trim_start_matches('+'), i.radix()) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.error_at(
                &v.span(),
                key,
                format!("{} is out of range {min}..={max}", i.as_str()),
            )),
        }
    }

    /// A number (integer or float) in `min..=max`.
    pub fn number(
        &mut self,
        key: &str,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(default);
        };
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) if i.radix() == 10 => {
                i.as_str().replace('_', "").parse::<f64>().ok()
            }
            _ => return Err(self.wrong_type(key, &v, "a number")),
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.error_at(&v.span(), key, format!("out of range {min}..={max}"))),
        }
    }

    /// A duration written with units ("250ms", "2s", "5m"), at least `min`
    /// and at most [`MAX_DURATION`].
    pub fn duration(
        &mut self,
        key: &str,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = self.string(key)? else {
            return Ok(default);
        };
        let d = humantime::parse_duration(&v.value).map_err(|e| {
            self.error_at(
                &v.span,
                key,
                format!(
                    "invalid duration \"{}\" ({e}); write e.g. \"250ms\", \"2s\", \"5m\"",
                    v.value
                ),
            )
        })?;
        if d < min || d > MAX_DURATION {
            return Err(self.error_at(
                &v.span,
                key,
                format!(
                    "{} is out of range {}..={}",
                    v.value,
                    humantime::format_duration(min),
                    humantime::format_duration(MAX_DURATION)
                ),
            ));
        }
        Ok(d)
    }

    /// A sub-table (`[admin]`, or inline: `drain = { window = "2m" }`),
    /// named `context` in messages.
    pub fn table(&mut self, key: &str, context: String) -> Result<Option<Table<'s>>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        let span = v.span();
        match v.into_inner() {
            DeValue::Table(entries) => Ok(Some(Table {
                src: self.src,
                entries,
                span,
                context,
            })),
            other => Err(self.error_at(
                &span,
                key,
                format!("expected a table, found {}", kind(&other)),
            )),
        }
    }

    /// An array of tables (`[[pool]]`).
    pub fn tables(&mut self, key: &str) -> Result<Vec<Table<'s>>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(Vec::new());
        };
        let span = v.span();
        let DeValue::Array(items) = v.into_inner() else {
            return Err(self.error_at(
                &span,
                key,
                "expected an array of tables, e.g. [[".to_string() + key + "]]",
            ));
        };
        let mut out = Vec::new();
        for item in items.iter() {
            let item_span = item.span();
            let DeValue::Table(t) = item.get_ref() else {
                return Err(self.error_at(&item_span, key, "expected a table".to_string()));
            };
            out.push(Table {
                src: self.src,
                entries: t.clone(),
                span: item_span,
                context: format!("{} {key}", self.context).trim().to_string(),
            });
        }
        Ok(out)
    }

    /// Ends reading: any key not read is unknown.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.entries.iter().min_by_key(|(k, _)| k.span().start) {
            None => Ok(()),
            Some((k, _)) => Err(self.src.error(
                &k.span(),
                &self.context,
                format!("unknown key \"{}\"", k.get_ref()),
            )),
        }
    }
}
