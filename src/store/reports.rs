//! Read-only queries behind the reports: consumption lists, statistics, exports, the audit log.
