//! Query strings, filters and keyset pagination.
//!
//! Every list takes its filters as query parameters with the contract's names and answers
//! `{"items": [...], "next_cursor": ...}`. Parameters are parsed one by one so a mistake names
//! its parameter (`422 invalid_field`), and a parameter a route does not know is refused rather
//! than silently ignored (a typo in a filter must not widen an export).

use axum::extract::{FromRequestParts, RawQuery};
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::ApiError;
use super::validate;
use crate::domain::UserId;

/// Items per page when `limit` is not given.
pub const PAGE_LIMIT_DEFAULT: i64 = 50;
/// Largest `limit` a list accepts.
pub const PAGE_LIMIT_MAX: i64 = 500;
/// Longest query string accepted, in bytes.
const QUERY_BYTES_MAX: usize = 4_096;

/// The query string of a request as name/value pairs, each name at most once.
#[derive(Debug, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let RawQuery(query) = RawQuery::from_request_parts(parts, state)
            .await
            .unwrap_or(RawQuery(None));
        Params::parse(query.as_deref().unwrap_or(""))
    }
}

impl Params {
    pub fn parse(query: &str) -> Result<Params, ApiError> {
        if query.len() > QUERY_BYTES_MAX {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "query_too_long",
                format!("the query string must be at most {QUERY_BYTES_MAX} bytes"),
            ));
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|error| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "malformed_query",
                format!("the query string cannot be parsed: {error}"),
            )
        })?;
        for (index, (name, _)) in pairs.iter().enumerate() {
            if pairs[..index].iter().any(|(seen, _)| seen == name) {
                return Err(ApiError::invalid_field(name, "is given more than once"));
            }
        }
        Ok(Params { pairs })
    }

    /// Refuses any parameter not in `known`.
    pub fn allow(&self, known: &[&str]) -> Result<(), ApiError> {
        match self
            .pairs
            .iter()
            .find(|(name, _)| !known.contains(&name.as_str()))
        {
            Some((name, _)) => Err(ApiError::invalid_field(
                name,
                format!(
                    "is not a parameter of this route (known: {})",
                    known.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// The raw value of `name`; an empty value counts as absent.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty())
    }

    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.text(name)
            .map(|value| {
                value
                    .parse::<i64>()
                    .map_err(|_| ApiError::invalid_field(name, "must be an integer"))
            })
            .transpose()
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.text(name)
            .map(|value| match value {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(ApiError::invalid_field(name, "must be true or false")),
            })
            .transpose()
    }

    /// A value that must be one of `allowed`.
    pub fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        self.text(name)
            .map(|value| {
                if allowed.contains(&value) {
                    Ok(value.to_owned())
                } else {
                    Err(ApiError::invalid_field(
                        name,
                        format!("must be one of {}", allowed.join(", ")),
                    ))
                }
            })
            .transpose()
    }

    pub fn user_id(&self, name: &str) -> Result<Option<UserId>, ApiError> {
        self.i64(name)?
            .map(|id| validate::user_id(name, id))
            .transpose()
    }

    pub fn action_key(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.text(name)
            .map(|value| {
                validate::action_key(value).map(str::to_owned).map_err(|_| {
                    ApiError::invalid_field(name, "must be 1-64 characters of [a-z0-9_.-]")
                })
            })
            .transpose()
    }

    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.text(name)
            .map(|value| {
                DateTime::parse_from_rfc3339(value)
                    .map(|at| at.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::invalid_field(
                            name,
                            "must be an RFC 3339 time, for example 2026-01-31T00:00:00Z",
                        )
                    })
            })
            .transpose()
    }

    /// `from` (inclusive) and `to` (exclusive); a range that ends before it starts is refused.
    pub fn time_range(&self) -> Result<TimeRange, ApiError> {
        let range = TimeRange {
            from: self.time("from")?,
            to: self.time("to")?,
        };
        if let (Some(from), Some(to)) = (range.from, range.to)
            && from >= to
        {
            return Err(ApiError::invalid_field("to", "must be later than from"));
        }
        Ok(range)
    }

    /// `limit` (default 50, at most 500) and the opaque `cursor` of the previous page.
    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = self.i64("limit")?.unwrap_or(PAGE_LIMIT_DEFAULT);
        if !(1..=PAGE_LIMIT_MAX).contains(&limit) {
            return Err(ApiError::invalid_field(
                "limit",
                format!("must be between 1 and {PAGE_LIMIT_MAX}"),
            ));
        }
        Ok(Page {
            limit,
            cursor: self.text("cursor").map(str::to_owned),
        })
    }
}

/// A time filter: `from` inclusive, `to` exclusive, either open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub cursor: Option<String>,
}

impl Page {
    /// Rows to fetch: one more than the page, to learn whether another page follows.
    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }

    /// The cursor as a keyset position of `(time, id)` lists (newest first).
    pub fn time_id(&self) -> Result<Option<(DateTime<Utc>, i64)>, ApiError> {
        self.cursor.as_deref().map(decode_time_id).transpose()
    }

    /// The cursor as a keyset position of lists ordered by an integer id.
    pub fn id(&self) -> Result<Option<i64>, ApiError> {
        self.cursor
            .as_deref()
            .map(|cursor| {
                decode(cursor)
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(bad_cursor)
            })
            .transpose()
    }

    /// The cursor as a keyset position of lists ordered by a text key.
    pub fn key(&self) -> Result<Option<String>, ApiError> {
        self.cursor
            .as_deref()
            .map(|cursor| decode(cursor).ok_or_else(bad_cursor))
            .transpose()
    }

    /// The cursor as a keyset position of `(sort key, id)` lists.
    pub fn key_id(&self) -> Result<Option<(i64, i64)>, ApiError> {
        self.cursor
            .as_deref()
            .map(|cursor| {
                decode(cursor)
                    .and_then(|text| {
                        let (key, id) = text.split_once('.')?;
                        Some((key.parse().ok()?, id.parse().ok()?))
                    })
                    .ok_or_else(bad_cursor)
            })
            .transpose()
    }

    /// Turns the fetched rows (at most `fetch_limit`) into a page, its cursor made from the
    /// last row shown.
    pub fn finish<T: Serialize>(
        &self,
        mut rows: Vec<T>,
        cursor_of: impl Fn(&T) -> String,
    ) -> List<T> {
        let more = rows.len() as i64 > self.limit;
        rows.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        let next_cursor = if more {
            rows.last().map(cursor_of)
        } else {
            None
        };
        List {
            items: rows,
            next_cursor,
        }
    }
}

/// A page of a list, as every list answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The cursor of `(time, id)` lists.
pub fn time_id_cursor(at: DateTime<Utc>, id: i64) -> String {
    encode(&format!("{}.{id}", at.timestamp_micros()))
}

/// The cursor of lists ordered by a text key.
pub fn key_cursor(key: &str) -> String {
    encode(key)
}

/// The cursor of `(sort key, id)` lists.
pub fn key_id_cursor(key: i64, id: i64) -> String {
    encode(&format!("{key}.{id}"))
}

/// The cursor of id-ordered lists.
pub fn id_cursor(id: i64) -> String {
    encode(&id.to_string())
}

fn decode_time_id(cursor: &str) -> Result<(DateTime<Utc>, i64), ApiError> {
    let text = decode(cursor).ok_or_else(bad_cursor)?;
    let (micros, id) = text.split_once('.').ok_or_else(bad_cursor)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad_cursor)?;
    let id = id.parse::<i64>().map_err(|_| bad_cursor())?;
    Ok((at, id))
}

// Cursors are opaque to clients: hex of a short text, so nobody builds them by hand.
fn encode(text: &str) -> String {
    hex::encode(text.as_bytes())
}

fn decode(cursor: &str) -> Option<String> {
    hex::decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

fn bad_cursor() -> ApiError {
    ApiError::invalid_field("cursor", "is not a cursor this list gave out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_bad_parameter() {
        let params = Params::parse("limit=0&from=yesterday").unwrap();
        assert_eq!(params.page().unwrap_err().details["field"], "limit");
        assert_eq!(params.time("from").unwrap_err().details["field"], "from");
        let params = Params::parse("user=1").unwrap();
        assert_eq!(
            params.allow(&["user_id"]).unwrap_err().details["field"],
            "user"
        );
        let params = Params::parse("limit=1&limit=2").unwrap_err();
        assert_eq!(params.details["field"], "limit");
    }

    #[test]
    fn refuses_a_reversed_range() {
        let params = Params::parse("from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z").unwrap();
        assert_eq!(params.time_range().unwrap_err().details["field"], "to");
    }

    #[test]
    fn cursors_round_trip_and_refuse_forgeries() {
        let at = DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap();
        let page = Page {
            limit: 10,
            cursor: Some(time_id_cursor(at, 42)),
        };
        assert_eq!(page.time_id().unwrap(), Some((at, 42)));
        let forged = Page {
            limit: 10,
            cursor: Some("zz".into()),
        };
        assert_eq!(forged.time_id().unwrap_err().details["field"], "cursor");
        assert_eq!(forged.id().unwrap_err().details["field"], "cursor");
    }

    #[test]
    fn a_page_says_whether_more_follow() {
        let page = Page {
            limit: 2,
            cursor: None,
        };
        let list = page.finish(vec![1, 2, 3], |n| id_cursor(*n));
        assert_eq!(list.items, vec![1, 2]);
        assert_eq!(list.next_cursor, Some(id_cursor(2)));
        let last = page.finish(vec![1, 2], |n| id_cursor(*n));
        assert_eq!(last.next_cursor, None);
    }
}
