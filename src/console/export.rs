//! The consumption report's downloads. Both come from the admin API's CSV export with the
//! page's filters, so the two files always hold the same rows and columns: the CSV is streamed
//! through as it is, the Excel workbook is built from it.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_xlsxwriter::{Format, Workbook, XlsxError};

use super::filters;
use super::views;
use super::{AdminSession, Console, Session};

/// Rows one workbook holds. Larger reports are for the CSV export (up to its own limit).
pub const XLSX_ROWS_MAX: usize = 100_000;

/// Bytes of CSV the workbook is built from: far above what `XLSX_ROWS_MAX` rows take unless
/// their metadata is huge, and a bound on the memory one download can hold.
const XLSX_SOURCE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Columns that hold whole numbers, written as numbers so a spreadsheet can sum them.
const NUMBER_COLUMNS: [&str; 8] = [
    "id",
    "user_id",
    "quantity",
    "unit_cost",
    "credits_cost",
    "price_version",
    "refunded_credits",
    "forfeited_credits",
];

/// Integers a spreadsheet number (an f64) holds exactly; larger ones are written as text.
const EXACT_INTEGER_MAX: i64 = 1 << 53;

const FILTERS: [&str; 3] = ["user_id", "action_key", "status"];

async fn csv_export(
    console: &Console,
    session: &Session,
    query: &filters::Query,
) -> Result<Response, Response> {
    let pairs = match filters::api_filters(query, &FILTERS) {
        Ok(pairs) => pairs,
        Err(failure) => return Err(failure.page(session)),
    };
    let uri = format!(
        "/api/admin/billing/consumption/export?{}",
        views::query_string(&pairs)
    );
    console
        .send(session, Method::GET, &uri, None)
        .await
        .map_err(|failure| failure.page(session))
}

pub async fn consumption_csv(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    csv_export(&console, &session, &query)
        .await
        .unwrap_or_else(|page| page)
}

pub async fn consumption_xlsx(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    let csv = match csv_export(&console, &session, &query).await {
        Ok(csv) => csv,
        Err(page) => return page,
    };
    let bytes = match axum::body::to_bytes(csv.into_body(), XLSX_SOURCE_BYTES_MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return views::message_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some(&session),
                "Report too large for Excel",
                &format!(
                    "The report could not be read whole ({error}). Narrow the filters, or use the CSV export."
                ),
            );
        }
    };
    let built = match tokio::task::spawn_blocking(move || workbook(&bytes, XLSX_ROWS_MAX)).await {
        Ok(built) => built.map_err(|error| error.to_string()),
        Err(task) => Err(format!("the workbook task failed: {task}")),
    };
    match built {
        Ok(Some(file)) => (
            [
                (
                    header::CONTENT_TYPE,
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                ),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"consumption.xlsx\"",
                ),
            ],
            Body::from(file),
        )
            .into_response(),
        Ok(None) => views::message_page(
            StatusCode::PAYLOAD_TOO_LARGE,
            Some(&session),
            "Report too large for Excel",
            &format!(
                "More than {XLSX_ROWS_MAX} records match. Narrow the filters, or use the CSV export."
            ),
        ),
        Err(error) => {
            tracing::error!(%error, "the consumption workbook could not be built");
            views::message_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(&session),
                "Export failed",
                "The workbook could not be built; the CSV export has the same rows.",
            )
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkbookError {
    #[error("the export's CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("the workbook: {0}")]
    Xlsx(#[from] XlsxError),
}

/// The CSV export as one worksheet, with the same header row; `None` when it has more than
/// `rows_max` rows.
fn workbook(csv_bytes: &[u8], rows_max: usize) -> Result<Option<Vec<u8>>, WorkbookError> {
    let mut reader = csv::Reader::from_reader(csv_bytes);
    let headers = reader.headers()?.clone();
    let numeric: Vec<bool> = headers
        .iter()
        .map(|name| NUMBER_COLUMNS.contains(&name))
        .collect();
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("consumption")?;
    let bold = Format::new().set_bold();
    for (column, name) in headers.iter().enumerate() {
        sheet.write_string_with_format(0, column_index(column)?, name, &bold)?;
    }
    let mut rows = 0usize;
    for record in reader.records() {
        let record = record?;
        rows += 1;
        if rows > rows_max {
            return Ok(None);
        }
        let row = u32::try_from(rows).map_err(|_| XlsxError::RowColumnLimitError)?;
        for (column, text) in record.iter().enumerate() {
            let index = column_index(column)?;
            let number = numeric
                .get(column)
                .copied()
                .unwrap_or(false)
                .then(|| text.parse::<i64>().ok())
                .flatten()
                .filter(|value| value.abs() <= EXACT_INTEGER_MAX);
            match number {
                Some(value) => sheet.write_number(row, index, value as f64)?,
                None if text.is_empty() => sheet,
                None => sheet.write_string(row, index, text)?,
            };
        }
    }
    sheet.set_freeze_panes(1, 0)?;
    sheet.autofit();
    Ok(Some(workbook.save_to_buffer()?))
}

fn column_index(column: usize) -> Result<u16, XlsxError> {
    u16::try_from(column).map_err(|_| XlsxError::RowColumnLimitError)
}

#[cfg(test)]
mod tests {
    use calamine::{Data, Reader, Xlsx};

    use super::*;

    const CSV: &str = "id,user_id,action_key,credits_cost,idempotency_key,metadata\n\
        7,42,ai_chat,3,key-1,\"{\"\"note\"\":\"\"a, b\"\"}\"\n\
        9007199254740993,42,pdf_export,1,,\n";

    #[test]
    fn the_workbook_holds_the_csv_rows_with_numbers_as_numbers() {
        let file = workbook(CSV.as_bytes(), 10).unwrap().unwrap();
        let mut book = Xlsx::new(std::io::Cursor::new(file)).unwrap();
        let sheet = book.worksheet_range("consumption").unwrap();
        let rows: Vec<Vec<Data>> = sheet.rows().map(<[Data]>::to_vec).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0][0], Data::String("id".to_owned()));
        assert_eq!(rows[1][0], Data::Float(7.0));
        assert_eq!(rows[1][3], Data::Float(3.0));
        assert_eq!(rows[1][2], Data::String("ai_chat".to_owned()));
        assert_eq!(rows[1][5], Data::String("{\"note\":\"a, b\"}".to_owned()));
        // Beyond 2^53 a spreadsheet number would round: the id stays exact, as text.
        assert_eq!(rows[2][0], Data::String("9007199254740993".to_owned()));
        assert_eq!(rows[2][4], Data::Empty);
    }

    #[test]
    fn a_report_over_the_row_limit_is_refused_not_cut() {
        assert!(workbook(CSV.as_bytes(), 1).unwrap().is_none());
        assert!(workbook(CSV.as_bytes(), 2).unwrap().is_some());
    }
}
