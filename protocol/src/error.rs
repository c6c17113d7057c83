//! Stable error codes that cross the wire between servers and clients.
//!
//! A code never changes meaning once released. Each code says whether the client may retry the
//! same request on another replica (`retryable`): a replica that does not host a partition yet is
//! worth retrying elsewhere, a malformed request is not.

/// A stable error code carried in error responses and batch-get trailers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request could not be parsed. Not retryable: it is the caller's bug.
    BadRequest = 1,
    /// No such store on this server. Retryable: the server may not have seen it yet.
    UnknownStore = 2,
    /// This server does not host the requested version.
    UnknownVersion = 3,
    /// This server hosts the version but the partition is not ONLINE here.
    PartitionNotServed = 4,
    /// The key is not in the store. Only used for single gets; not an error for the caller.
    KeyNotFound = 5,
    /// More keys in one batch-get than the server accepts.
    TooManyKeys = 6,
    /// Request body, key or value larger than the configured limit.
    TooLarge = 7,
    /// The server failed internally (storage error). Retryable elsewhere.
    Internal = 8,
    /// The server is shedding load. Retryable elsewhere.
    Overloaded = 9,
    /// The request's protocol version is not understood by this server.
    UnsupportedProtocol = 10,
    /// No route: the path does not name a known endpoint.
    NotFound = 11,
    /// The stored value cannot be served as stored (a chunk of a large value is missing or
    /// does not match its manifest). Retryable elsewhere: another replica may hold it whole.
    CorruptValue = 12,
    /// The store's read quota on this server is used up. Not retryable on another replica:
    /// every replica enforces its share; the application should slow down.
    QuotaExceeded = 13,
    /// The caller's principal lacks the permission the request needs. Not retryable.
    Forbidden = 14,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownStore,
        ErrorCode::UnknownVersion,
        ErrorCode::PartitionNotServed,
        ErrorCode::KeyNotFound,
        ErrorCode::TooManyKeys,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::Overloaded,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::NotFound,
        ErrorCode::CorruptValue,
        ErrorCode::QuotaExceeded,
        ErrorCode::Forbidden,
    ];

    /// The numeric code as sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Parses a wire code; unknown codes (from a newer server) map to `None`.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_u16() == code)
    }

    /// Whether the same request may succeed on another replica or later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownStore
                | ErrorCode::UnknownVersion
                | ErrorCode::PartitionNotServed
                | ErrorCode::Internal
                | ErrorCode::Overloaded
                | ErrorCode::CorruptValue
        )
    }

    /// The HTTP status that accompanies the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::UnsupportedProtocol => 400,
            ErrorCode::UnknownStore
            | ErrorCode::UnknownVersion
            | ErrorCode::KeyNotFound
            | ErrorCode::NotFound => 404,
            ErrorCode::TooManyKeys | ErrorCode::TooLarge => 413,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::Forbidden => 403,
            ErrorCode::PartitionNotServed | ErrorCode::Overloaded => 503,
            ErrorCode::Internal | ErrorCode::CorruptValue => 500,
        }
    }

    /// A short stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownStore => "unknown_store",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::PartitionNotServed => "partition_not_served",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::TooManyKeys => "too_many_keys",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::NotFound => "not_found",
            ErrorCode::CorruptValue => "corrupt_value",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name(), self.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()));
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(999), None);
    }

    #[test]
    fn malformed_requests_are_not_retryable() {
        assert!(!ErrorCode::BadRequest.retryable());
        assert!(ErrorCode::PartitionNotServed.retryable());
        assert!(!ErrorCode::QuotaExceeded.retryable());
        assert!(ErrorCode::Overloaded.retryable());
    }
}
