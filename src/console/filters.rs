//! The filters of the console's lists: what the page's query says, checked, and turned into the
//! API's query parameters.

use std::collections::HashMap;

use chrono::{Days, NaiveDate, NaiveDateTime};

use super::Failure;

/// A page's query string, by name.
pub type Query = HashMap<String, String>;

/// The value of a query parameter, trimmed; empty when missing.
pub fn param(query: &Query, name: &str) -> String {
    query
        .get(name)
        .map(|value| value.trim().to_owned())
        .unwrap_or_default()
}

/// The named parameters as they are, plus `from`/`to` (dates, both inclusive on the page)
/// as the API's RFC 3339 range (`to` exclusive). A date that is not one names its field.
pub fn api_filters(
    query: &Query,
    names: &[&'static str],
) -> Result<Vec<(&'static str, String)>, Failure> {
    let mut pairs: Vec<(&'static str, String)> = names
        .iter()
        .map(|name| (*name, param(query, name)))
        .collect();
    if let Some(from) = date(query, "from")? {
        pairs.push(("from", format!("{from}T00:00:00Z")));
    }
    if let Some(to) = date(query, "to")? {
        let next_day = to
            .checked_add_days(Days::new(1))
            .ok_or_else(|| Failure::field("to", "is too far in the future"))?;
        pairs.push(("to", format!("{next_day}T00:00:00Z")));
    }
    Ok(pairs)
}

/// The page's own query (to keep filters in links), with the dates as the page shows them.
pub fn page_filters(query: &Query, names: &[&'static str]) -> Vec<(&'static str, String)> {
    names
        .iter()
        .chain(&["from", "to"])
        .map(|name| (*name, param(query, name)))
        .collect()
}

fn date(query: &Query, name: &str) -> Result<Option<NaiveDate>, Failure> {
    let text = param(query, name);
    if text.is_empty() {
        return Ok(None);
    }
    NaiveDate::parse_from_str(&text, "%Y-%m-%d")
        .map(Some)
        .map_err(|_| Failure::field(name, "must be a date, YYYY-MM-DD"))
}

/// A `datetime-local` input (`2026-12-01T10:30`, taken as UTC) as RFC 3339.
pub fn datetime_local(field: &str, text: &str) -> Result<String, Failure> {
    let parsed = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| Failure::field(field, "must be a date and time, YYYY-MM-DDTHH:MM (UTC)"))?;
    Ok(parsed.and_utc().to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Query {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn dates_become_a_half_open_utc_range() {
        let pairs = api_filters(
            &query(&[
                ("from", "2026-11-01"),
                ("to", "2026-11-30"),
                ("user_id", " 7 "),
            ]),
            &["user_id"],
        )
        .unwrap();
        assert_eq!(
            pairs,
            vec![
                ("user_id", "7".to_owned()),
                ("from", "2026-11-01T00:00:00Z".to_owned()),
                ("to", "2026-12-01T00:00:00Z".to_owned()),
            ]
        );
    }

    #[test]
    fn a_bad_date_names_its_field() {
        let failure = api_filters(&query(&[("to", "30/11/2026")]), &[]).unwrap_err();
        assert_eq!(failure.field.as_deref(), Some("to"));
    }

    #[test]
    fn datetime_local_is_utc() {
        assert_eq!(
            datetime_local("expires_at", "2026-12-01T10:30").unwrap(),
            "2026-12-01T10:30:00+00:00"
        );
        assert!(datetime_local("expires_at", "tomorrow").is_err());
    }
}
