//! Small shared helpers.

use std::io::Write;
use std::path::Path;

/// Reads a whole regular file. FIFOs, devices and directories are refused before they are opened
/// (a FIFO would block forever, `/dev/zero` never ends).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    std::fs::read(path)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, then rename, so a
/// crash or a full disk never leaves a half-written file where a good one was. Only a regular file
/// is ever replaced: a device, FIFO, directory or symbolic link at `path` is an error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "exists and is not a regular file; refusing to replace it",
            ));
        }
        _ => {}
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Said here: tempfile's own error would name its temp file, not the folder the user gave.
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the folder `{}` does not exist", dir.display()),
        ));
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    // Temp files are created 0600; results are ordinary user files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Bytes of memory the OS reports as available (Linux `MemAvailable`), if it says.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Fails with a one-line error when `needed` bytes (an estimate of `what`) exceed the memory
/// available, rather than letting the allocation abort the process.
pub fn check_memory(needed: u64, what: &str) -> anyhow::Result<()> {
    if let Some(available) = available_memory()
        && needed > available
    {
        anyhow::bail!(
            "{what} needs about {:.1} GB, more than the {:.1} GB this machine has available",
            needed as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// Longest piece of file-supplied text an error message quotes.
const QUOTE_LIMIT: usize = 120;

/// Text from a file or an argument made safe to print in a one-line message: control characters
/// (newlines, ANSI escapes) escaped, and cut to [`QUOTE_LIMIT`] characters.
pub fn quote_for_message(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == QUOTE_LIMIT {
            out.push_str(&format!("... ({} bytes in all)", text.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes an RGB8 raster of `w x h` pixels (a plot's buffer) as a PNG file, atomically.
pub fn write_png(path: &Path, (w, h): (u32, u32), rgb: Vec<u8>) -> anyhow::Result<()> {
    let img = image::RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| anyhow::anyhow!("a {w}x{h} image needs {} bytes", w * h * 3))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    write_atomic(path, &png)?;
    Ok(())
}

/// One JSON line per item (each ended by a newline): the `.jsonl` records runs and searches write.
pub fn to_jsonl<T: serde::Serialize>(items: &[T]) -> serde_json::Result<String> {
    let mut out = String::new();
    for item in items {
        out.push_str(&serde_json::to_string(item)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn special_files_are_neither_read_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(read_regular(&fifo).is_err());
        assert!(write_atomic(&fifo, b"x").is_err());
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_atomic(&link, b"x").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(read_regular(dir.path()).is_err());
        write_atomic(&target, b"new").unwrap();
        assert_eq!(read_regular(&target).unwrap(), b"new");
        let missing = dir.path().join("no such folder").join("out.npy");
        let err = write_atomic(&missing, b"x").unwrap_err().to_string();
        let folder = missing.parent().unwrap().display();
        assert_eq!(err, format!("the folder `{folder}` does not exist"));
    }

    #[test]
    fn quoted_text_is_one_short_line() {
        assert_eq!(quote_for_message("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(10_000);
        let q = quote_for_message(&long);
        assert!(q.len() < 200 && q.ends_with("(10000 bytes in all)"), "{q}");
    }
}
