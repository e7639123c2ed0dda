//! A model's digest: what identifies its files wherever they are, so a figure measured on one
//! machine is found on another (`gantry_core::measured`).
//!
//! `sha256s:` then the hex SHA-256 of, for each file the weights and their meaning depend on
//! (a `.gguf` file; or a folder's `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json` and `*.safetensors`), in name order: the file's name, its length
//! (u64 little-endian), and its bytes sampled — all of a file up to 16 MiB; else its first and
//! last 4 MiB and 64 KiB at each of 64 evenly spaced places between. A header (GGUF metadata,
//! safetensors JSON), a changed length or a re-quantization (which changes bytes everywhere)
//! changes the digest; reading ~8 MiB per file keeps it cheap for a 140 GB model. It names
//! files; it does not check their integrity (the Hub download does that).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{FilesError, ModelLocation, io_err, list_with_extension, locate};

/// Files hashed whole up to this size.
const WHOLE_BYTES: u64 = 16 << 20;
/// The head and tail hashed of a larger file.
const END_BYTES: u64 = 4 << 20;
/// The samples between head and tail, and their size.
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 64 << 10;

/// The digest of the model at `path` (a `.gguf` file, a folder, or its `config.json`).
pub fn digest(path: &Path) -> Result<String, FilesError> {
    let files = match locate(path)? {
        ModelLocation::Gguf(file) => vec![file],
        ModelLocation::Folder(dir) => {
            let mut files: Vec<PathBuf> =
                ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
                    .iter()
                    .map(|n| dir.join(n))
                    .filter(|p| p.is_file())
                    .collect();
            files.extend(list_with_extension(&dir, "safetensors")?);
            files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
            files
        }
    };
    let mut hash = Sha256::new();
    for file in &files {
        hash_file(&mut hash, file)?;
    }
    let out = hash.finalize();
    Ok(format!("sha256s:{}", out.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

fn hash_file(hash: &mut Sha256, path: &Path) -> Result<(), FilesError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    hash.update(name.as_bytes());
    hash.update([0]);
    hash.update(len.to_le_bytes());
    let ranges: Vec<(u64, u64)> = if len <= WHOLE_BYTES {
        vec![(0, len)]
    } else {
        let middle = len - 2 * END_BYTES;
        let mut r = vec![(0, END_BYTES)];
        r.extend((0..SAMPLES).map(|i| (END_BYTES + middle / SAMPLES * i, SAMPLE_BYTES.min(middle / SAMPLES))));
        r.push((len - END_BYTES, END_BYTES));
        r
    };
    let mut buf = vec![0u8; 1 << 20];
    for (start, n) in ranges {
        f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        let mut left = n;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..want]).map_err(io_err(path))?;
            hash.update(&buf[..want]);
            left -= want as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn the_same_bytes_anywhere_give_one_digest_and_a_changed_byte_another() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = b"GGUF".to_vec();
        data.extend((0..(20u32 << 20)).map(|i| (i % 251) as u8));
        let a = dir.path().join("a.gguf");
        let b = dir.path().join("sub");
        std::fs::create_dir(&b).unwrap();
        let b = b.join("a.gguf");
        write(&a, &data);
        write(&b, &data);
        let d = digest(&a).unwrap();
        assert!(d.starts_with("sha256s:") && d.len() == 8 + 64, "{d}");
        assert_eq!(digest(&b).unwrap(), d);
        // A byte in the last 4 MiB (sampled), and the length.
        let n = data.len();
        data[n - 10] ^= 1;
        write(&b, &data);
        assert_ne!(digest(&b).unwrap(), d);
        data.push(0);
        write(&a, &data);
        assert_ne!(digest(&a).unwrap(), d);
    }

    #[test]
    fn a_folder_digest_covers_its_config() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("config.json"), br#"{"model_type":"llama"}"#);
        write(&dir.path().join("model.safetensors"), b"\x02\0\0\0\0\0\0\0{}");
        let d1 = digest(dir.path()).unwrap();
        assert_eq!(digest(&dir.path().join("config.json")).unwrap(), d1);
        write(&dir.path().join("config.json"), br#"{"model_type":"mistral"}"#);
        assert_ne!(digest(dir.path()).unwrap(), d1);
        assert!(matches!(
            digest(&dir.path().join("missing")),
            Err(FilesError::Io { .. } | FilesError::NotFound { .. })
        ));
    }
}
