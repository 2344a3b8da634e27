//! What leasehold writes into etcd: lock key values, the compares that recognise them, and
//! revisions read back as fencing tokens.

use etcd_client::{Compare, CompareOp, TxnResponse};

use crate::backend::OwnerToken;
use crate::error::StoreError;

/// A lock key's value, as leasehold writes it: `OWNER\nGRANTED[\nMETADATA]`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Holder<'a> {
    pub(super) owner: OwnerToken,
    /// The ttl in seconds the key's lease was granted with.
    pub(super) granted: i64,
    pub(super) metadata: Option<&'a str>,
}

impl<'a> Holder<'a> {
    pub(super) fn encode(owner: OwnerToken, granted: i64, metadata: Option<&str>) -> String {
        match metadata {
            Some(metadata) => format!("{owner}\n{granted}\n{metadata}"),
            None => format!("{owner}\n{granted}"),
        }
    }

    /// `None` for a value leasehold did not write (a Lock-service key before we wrote ours).
    pub(super) fn decode(value: &'a [u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?;
        let (owner, rest) = value.split_once('\n')?;
        if owner.len() != 32 {
            return None;
        }
        let owner = OwnerToken::from_u128(u128::from_str_radix(owner, 16).ok()?);
        let (granted, metadata) = match rest.split_once('\n') {
            Some((granted, metadata)) => (granted, Some(metadata)),
            None => (rest, None),
        };
        Some(Holder {
            owner,
            granted: granted.parse().ok()?,
            metadata,
        })
    }
}

/// The compares that hold exactly when `key`'s value was written for `owner`, without
/// knowing the rest of the value: `"OWNER\n" < value < "OWNER\x0b"`.
///
/// Every value leasehold writes starts with 32 hex digits and `\n` and goes on with at least
/// one digit. A value between the two bounds starts with the same 32 digits (the first digit
/// that differed would put it below or above both), and its next byte is at least `\n` and
/// below `\x0b`, so it is `\n` and the value is longer than `"OWNER\n"`: it is one of ours.
pub(super) fn owner_compares(key: &[u8], owner: OwnerToken) -> Vec<Compare> {
    vec![
        Compare::value(key, CompareOp::Greater, format!("{owner}\n")),
        Compare::value(key, CompareOp::Less, format!("{owner}\x0b")),
    ]
}

pub(super) fn txn_revision(answer: &TxnResponse) -> Result<i64, StoreError> {
    answer
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::protocol("etcd txn answer without a header"))
}

pub(super) fn token(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| StoreError::protocol(format!("etcd revision {revision} is not positive")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let owner = OwnerToken::random();
        for metadata in [None, Some(""), Some("host-7\npid 42")] {
            let value = Holder::encode(owner, 30, metadata);
            let holder = Holder::decode(value.as_bytes()).expect("decodes");
            assert_eq!(
                holder,
                Holder {
                    owner,
                    granted: 30,
                    metadata
                }
            );
        }
        assert_eq!(Holder::decode(b""), None);
        assert_eq!(Holder::decode(b"someone-else"), None);
    }

    #[test]
    fn owner_bounds_enclose_exactly_the_owners_values() {
        let owner = OwnerToken::from_u128(0xabc);
        let low = format!("{owner}\n");
        let high = format!("{owner}\x0b");
        let inside = |v: &str| low.as_str() < v && v < high.as_str();
        assert!(inside(&Holder::encode(owner, 1, None)));
        assert!(inside(&Holder::encode(owner, 86400, Some("\u{10ffff}"))));
        for other in [0xabb, 0xabd, u128::MAX, 0] {
            let other = OwnerToken::from_u128(other);
            assert!(!inside(&Holder::encode(other, 1, Some("x"))));
        }
        assert!(!inside(&owner.to_string()));
        assert!(!inside(&low));
        assert!(!inside(""));
    }
}
