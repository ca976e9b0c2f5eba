//! Little-endian decoding of the binary formats kiln reads (safetensors payloads, token
//! shards, llama2.c files, packed artifacts, tokenizer.bin, TensorBoard records), written once.
//! Each function decodes whole elements and leaves a ragged tail to the caller's length check.

use half::{bf16, f16};

/// A fixed-width little-endian value.
pub trait LeValue: Sized {
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! le_value {
    ($($t:ty),*) => {$(
        impl LeValue for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes[..Self::SIZE].try_into().expect("SIZE bytes"))
            }
        }
    )*};
}
le_value!(u16, u32, u64, i32, i64, f32, f64);

impl LeValue for f16 {
    const SIZE: usize = 2;
    fn from_le(bytes: &[u8]) -> Self {
        f16::from_le_bytes([bytes[0], bytes[1]])
    }
}

impl LeValue for bf16 {
    const SIZE: usize = 2;
    fn from_le(bytes: &[u8]) -> Self {
        bf16::from_le_bytes([bytes[0], bytes[1]])
    }
}

/// Every whole element of `bytes`.
pub fn le_values<T: LeValue>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(T::SIZE).map(T::from_le).collect()
}

/// The value at byte offset `at`, or `None` past the end.
pub fn le_at<T: LeValue>(bytes: &[u8], at: usize) -> Option<T> {
    bytes.get(at..at.checked_add(T::SIZE)?).map(T::from_le)
}

/// f32, f16 or bf16 little-endian values widened to f32.
pub fn le_floats(bytes: &[u8], width: FloatWidth) -> Vec<f32> {
    match width {
        FloatWidth::F32 => le_values::<f32>(bytes),
        FloatWidth::F16 => le_values::<f16>(bytes)
            .into_iter()
            .map(f16::to_f32)
            .collect(),
        FloatWidth::BF16 => le_values::<bf16>(bytes)
            .into_iter()
            .map(bf16::to_f32)
            .collect(),
    }
}

/// The float encodings kiln reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatWidth {
    F32,
    F16,
    BF16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_width_and_stops_at_the_end() {
        let bytes = [1u8, 0, 0, 0, 0, 0, 0x80, 0x3f, 9];
        assert_eq!(le_values::<u32>(&bytes), [1, 0x3f80_0000]);
        assert_eq!(le_at::<f32>(&bytes, 4), Some(1.0));
        assert_eq!(le_at::<f32>(&bytes, 6), None);
        assert_eq!(le_at::<u16>(&bytes, usize::MAX), None);
        assert_eq!(le_floats(&[0x80, 0x3f], FloatWidth::BF16), [1.0]);
        assert_eq!(le_floats(&[0x00, 0x3c], FloatWidth::F16), [1.0]);
    }
}
