//! Compression of packed artifacts: zstd, xz and brotli are all tried and the smallest kept.

use anyhow::{Context, Result};
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

pub fn decompress(codec: Codec, bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    match codec {
        Codec::Zstd => {
            zstd::stream::read::Decoder::new(bytes)?
                .read_to_end(&mut out)
                .context("zstd")?;
        }
        Codec::Xz => {
            liblzma::read::XzDecoder::new(bytes)
                .read_to_end(&mut out)
                .context("xz")?;
        }
        Codec::Brotli => {
            brotli::BrotliDecompress(&mut &bytes[..], &mut out).context("brotli")?;
        }
    }
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
        assert_eq!(decompress(codec, &bytes).unwrap(), data);
        for (c, _) in sizes {
            assert_eq!(
                decompress(c, &compress(c, &data).unwrap()).unwrap(),
                data,
                "{c:?}"
            );
        }
    }
}
