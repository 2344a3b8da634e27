//! The byte encoding of the remote protocol: big-endian integers and length-prefixed strings,
//! written field by field. ractor_cluster carries each message argument as one opaque byte
//! string (`ractor::BytesConvertable`); this is what goes inside it. It has no serde so the
//! crate keeps its dependency list short, and every type has exactly one encoding.

use std::time::Duration;

/// Something that can be written to and read back from the wire.
pub(crate) trait Wire: Sized {
    fn put(&self, out: &mut Vec<u8>);
    /// `None` when the input is truncated or malformed.
    fn take(input: &mut &[u8]) -> Option<Self>;
}

/// Encodes one value as a whole byte string.
pub(crate) fn encode<T: Wire>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.put(&mut out);
    out
}

/// Decodes one value from a whole byte string. `BytesConvertable` has no error path and says
/// panicking is acceptable: ractor_cluster then fails that one message's session task, which
/// is what a peer speaking another protocol version deserves.
pub(crate) fn decode<T: Wire>(bytes: &[u8]) -> T {
    let mut input = bytes;
    match T::take(&mut input) {
        Some(value) if input.is_empty() => value,
        _ => panic!(
            "malformed leasehold cluster message ({} bytes, expected {})",
            bytes.len(),
            std::any::type_name::<T>()
        ),
    }
}

fn split<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, tail) = input.split_at(n);
    *input = tail;
    Some(head)
}

macro_rules! int_wire {
    ($($ty:ty),*) => {$(
        impl Wire for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn take(input: &mut &[u8]) -> Option<Self> {
                let bytes = split(input, std::mem::size_of::<$ty>())?;
                Some(<$ty>::from_be_bytes(bytes.try_into().ok()?))
            }
        }
    )*};
}
int_wire!(u8, u32, u64, u128);

impl Wire for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        (self.len() as u32).put(out);
        out.extend_from_slice(self.as_bytes());
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        let len = u32::take(input)? as usize;
        String::from_utf8(split(input, len)?.to_vec()).ok()
    }
}

/// Nanoseconds, saturating at `u64::MAX` (some 584 years).
impl Wire for Duration {
    fn put(&self, out: &mut Vec<u8>) {
        (self.as_nanos().min(u128::from(u64::MAX)) as u64).put(out);
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        Some(Duration::from_nanos(u64::take(input)?))
    }
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                value.put(out);
            }
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            0 => Some(None),
            1 => Some(Some(T::take(input)?)),
            _ => None,
        }
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        (self.len() as u32).put(out);
        for item in self {
            item.put(out);
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        let len = u32::take(input)? as usize;
        // Bounded by the input, so a forged length cannot make us allocate much.
        let mut items = Vec::with_capacity(len.min(input.len()));
        for _ in 0..len {
            items.push(T::take(input)?);
        }
        Some(items)
    }
}

/// Implements `Wire` for a struct, field by field in the order given.
macro_rules! wire_struct {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $crate::cluster::wire::Wire for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                $( $crate::cluster::wire::Wire::put(&self.$field, out); )*
            }
            fn take(input: &mut &[u8]) -> Option<Self> {
                Some($ty { $( $field: $crate::cluster::wire::Wire::take(input)?, )* })
            }
        }
    };
}
pub(crate) use wire_struct;

/// Implements `ractor::BytesConvertable` through `Wire`.
macro_rules! bytes_convertable {
    ($($ty:ty),* $(,)?) => {$(
        impl ractor::BytesConvertable for $ty {
            fn into_bytes(self) -> Vec<u8> {
                $crate::cluster::wire::encode(&self)
            }
            fn from_bytes(bytes: Vec<u8>) -> Self {
                $crate::cluster::wire::decode(&bytes)
            }
        }
    )*};
}
pub(crate) use bytes_convertable;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let value = (
            Some("jobs/nightly".to_string()),
            Duration::from_millis(1500),
            u128::MAX - 7,
        );
        let mut out = Vec::new();
        value.0.put(&mut out);
        value.1.put(&mut out);
        value.2.put(&mut out);
        let mut input = &out[..];
        assert_eq!(<Option<String> as Wire>::take(&mut input), Some(value.0));
        assert_eq!(<Duration as Wire>::take(&mut input), Some(value.1));
        assert_eq!(<u128 as Wire>::take(&mut input), Some(value.2));
        assert!(input.is_empty());
    }

    #[test]
    fn truncated_input_is_refused() {
        let out = encode(&"abcdef".to_string());
        let mut input = &out[..out.len() - 1];
        assert_eq!(<String as Wire>::take(&mut input), None);
    }
}
