//! Compressed clusters: qcow2's default compression is a raw deflate
//! stream (zlib without its header) that inflates to exactly one cluster.

/// Inflate `raw` (which may carry trailing bytes of the next cluster's
/// sector) into one cluster of `cluster_size` bytes. Output is bounded by
/// the cluster size whatever the input claims.
pub fn inflate(raw: &[u8], cluster_size: usize) -> Result<Vec<u8>, String> {
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(raw, cluster_size)
        .map_err(|e| format!("cannot inflate: {:?}", e.status))?;
    if out.len() != cluster_size {
        return Err(format!(
            "inflates to {} bytes, not the cluster's {cluster_size}",
            out.len()
        ));
    }
    Ok(out)
}

/// Deflate one cluster (for tests that build compressed images).
#[cfg(test)]
pub fn deflate(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        let mut z = deflate(&data);
        z.extend_from_slice(&[0xaa; 300]); // the rest of the last sector
        assert_eq!(inflate(&z, 65536).unwrap(), data);
        // A stream that inflates to more, or less, than a cluster.
        assert!(inflate(&z, 4096).is_err());
        assert!(inflate(&deflate(&data[..1000]), 65536).is_err());
        assert!(inflate(&[0xff; 64], 65536).is_err());
    }
}
