//! Compression of packed artifacts: zstd, xz and brotli are all tried and the smallest kept.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// Compression codecs tried by [`compress_smallest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Zstd,
    Xz,
    Brotli,
}

pub fn compress(codec: Codec, bytes: &[u8]) -> Result<Vec<u8>> {
    Ok(match codec {
        Codec::Zstd => zstd::bulk::compress(bytes, 22)?,
        Codec::Xz => {
            use std::io::Read;
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(bytes, 9 | liblzma::stream::PRESET_EXTREME)
                .read_to_end(&mut out)?;
            out
        }
        Codec::Brotli => {
            let mut out = Vec::new();
            let params = brotli::enc::BrotliEncoderParams {
                quality: 11,
                lgwin: 24,
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &bytes[..], &mut out, &params)?;
            out
        }
    })
}

/// Decompresses `bytes`, refusing a stream that expands past `limit` bytes (read no further).
pub fn decompress(codec: Codec, bytes: &[u8], limit: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let reader: Box<dyn Read + '_> = match codec {
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(bytes).context("zstd")?),
        Codec::Xz => Box::new(liblzma::read::XzDecoder::new(bytes)),
        Codec::Brotli => Box::new(brotli::Decompressor::new(bytes, 4096)),
    };
    // One byte past the limit is read, to tell an exact fit from an overflow, and no more:
    // a small damaged (or hostile) stream can expand without end.
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("{codec:?}"))?;
    ensure!(
        out.len() <= limit,
        "decompresses to more than the {limit} bytes it should hold"
    );
    Ok(out)
}

/// Compresses with every codec and keeps the smallest: `(codec, bytes, every codec's size)`.
pub fn compress_smallest(bytes: &[u8]) -> Result<(Codec, Vec<u8>, Vec<(Codec, usize)>)> {
    let mut best: Option<(Codec, Vec<u8>)> = None;
    let mut sizes = Vec::new();
    for codec in [Codec::Zstd, Codec::Xz, Codec::Brotli] {
        let c = compress(codec, bytes)?;
        sizes.push((codec, c.len()));
        if best.as_ref().is_none_or(|(_, b)| c.len() < b.len()) {
            best = Some((codec, c));
        }
    }
    let (codec, out) = best.expect("three codecs tried");
    Ok((codec, out, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_the_smallest_is_kept() {
        let data: Vec<u8> = (0..20000u32).map(|i| ((i * i) % 251) as u8 % 7).collect();
        let (codec, bytes, sizes) = compress_smallest(&data).unwrap();
        assert_eq!(sizes.len(), 3);
        assert_eq!(bytes.len(), sizes.iter().map(|s| s.1).min().unwrap());
        assert!(
            bytes.len() < data.len() / 4,
            "this data is very compressible"
        );
        assert_eq!(decompress(codec, &bytes, data.len()).unwrap(), data);
        // A stream that expands past what it should hold is refused.
        let err = decompress(codec, &bytes, data.len() - 1).unwrap_err();
        assert!(format!("{err:#}").contains("more than"), "{err:#}");
        for (c, _) in sizes {
            assert_eq!(
                decompress(c, &compress(c, &data).unwrap(), data.len()).unwrap(),
                data,
                "{c:?}"
            );
        }
    }
}
