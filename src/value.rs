//! The error of a value that is not what a setting accepts, shared by every value parser (the
//! configuration's and the cookie's), so that neither module needs the other for it.

use std::borrow::Cow;

/// A value that is not what a setting accepts. Its text names what is accepted; it shows the value
/// only where the value cannot hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{expected}", value.as_ref().map(|v| format!("`{v}` is not ")).unwrap_or_else(|| "expected ".into()))]
pub struct InvalidValue {
    value: Option<String>,
    expected: Cow<'static, str>,
}

impl InvalidValue {
    /// `value` is not `expected` (for example "a duration like 30m").
    pub fn new(value: &str, expected: impl Into<Cow<'static, str>>) -> Self {
        InvalidValue {
            value: Some(value.chars().take(200).collect()),
            expected: expected.into(),
        }
    }

    /// Like [`InvalidValue::new`], for a value that may hold a secret and is never shown.
    pub fn redacted(expected: impl Into<Cow<'static, str>>) -> Self {
        InvalidValue {
            value: None,
            expected: expected.into(),
        }
    }
}
