//! The contract every wire parser keeps, checked on each fuzz input.

use ksocks::socks5::Parsed;
use std::fmt::Debug;

/// Parse `data` and check: a message consumes 1..=len bytes and parses the
/// same from exactly those bytes; a verdict reached on a prefix (message or
/// error) stands for the whole input; "need more" on the whole input means
/// "need more" on the prefix too. Returns the full-input result.
pub fn check<'a, T: PartialEq + Debug>(
    data: &'a [u8],
    parse: impl Fn(&'a [u8]) -> Parsed<T>,
) -> Parsed<T> {
    let full = parse(data);
    if let Ok(Some((_, n))) = &full {
        assert!(0 < *n && *n <= data.len(), "consumed {n} of {}", data.len());
        assert_eq!(
            parse(&data[..*n]),
            full,
            "message changed when cut at its end"
        );
    }
    let half = parse(&data[..data.len() / 2]);
    match &half {
        Ok(None) => {}
        verdict => assert_eq!(verdict, &full, "prefix verdict overturned"),
    }
    if let Ok(None) = full {
        assert_eq!(half, Ok(None));
    }
    full
}
