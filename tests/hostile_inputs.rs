//! The readers against hostile and damaged input: property tests (random truncations, byte flips,
//! random opcode streams) that must never panic and never allocate beyond a fixed multiple of the
//! input's size, and one test per family of known attacks (memo and nesting bombs, huge or wrapping
//! views, decompression bombs, forbidden globals).
//!
//! The property tests run `PROPTEST_CASES` cases each (default 64, a few seconds); a longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test hostile_inputs`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

/// Counts live heap bytes and their peak, for "memory beyond a fixed multiple of the file".
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `System.alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `System.dealloc`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Memory a reader may use for an input of `len` bytes.
fn allowance(len: usize) -> usize {
    64 * len + (48 << 20)
}

/// Runs `read` on `bytes` written to a file; returns its error text (None on success) and checks
/// the peak memory it took.
fn read_file<T, E: ToString>(
    bytes: &[u8],
    name: &str,
    read: impl FnOnce(&Path) -> Result<T, E>,
) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = read(&path).err().map(|e| e.to_string());
    let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        used <= allowance(bytes.len()),
        "{name}: {used} bytes for a {}-byte input",
        bytes.len()
    );
    out
}

fn weights(bytes: &[u8], name: &str) -> Option<String> {
    read_file(bytes, name, effnet::weights::read_tensors)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

/// A zip checkpoint as `torch.save` writes it (entries stored) holding `data.pkl` and `storages`.
fn zip_checkpoint(
    pkl: &[u8],
    storages: &[(&str, &[u8])],
    method: zip::CompressionMethod,
) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    for (name, data) in storages {
        w.start_file(format!("archive/data/{name}"), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Pickle protocol 2 helpers.
fn short_str(s: &str) -> Vec<u8> {
    let mut v = vec![0x8c, s.len() as u8];
    v.extend(s.as_bytes());
    v
}

fn global(module: &str, name: &str) -> Vec<u8> {
    [short_str(module), short_str(name), vec![0x93]].concat()
}

fn int(i: i64) -> Vec<u8> {
    let mut v = vec![0x8a, 8];
    v.extend(i.to_le_bytes());
    v
}

/// `{'w': _rebuild_tensor_v2(storage('0', FloatStorage, n), offset, size, stride, False, {})}`.
fn tensor_pickle(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
    let tuple = |items: &[i64]| -> Vec<u8> {
        let mut v = vec![b'('];
        for &i in items {
            v.extend(int(i));
        }
        v.push(b't');
        v
    };
    let mut p = vec![0x80, 2, b'}'];
    p.extend(short_str("w"));
    p.extend(global("torch._utils", "_rebuild_tensor_v2"));
    p.push(b'(');
    // Persistent id: ('storage', FloatStorage, '0', 'cpu', numel).
    p.push(b'(');
    p.extend(short_str("storage"));
    p.extend(global("torch", "FloatStorage"));
    p.extend(short_str("0"));
    p.extend(short_str("cpu"));
    p.extend(int(numel));
    p.extend(b"tQ");
    p.extend(int(offset));
    p.extend(tuple(size));
    p.extend(tuple(stride));
    p.push(0x89); // False
    p.push(b'}');
    p.extend(b"tR"); // call
    p.extend(b"s."); // SETITEM, STOP
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn damaged_checkpoints_are_errors(
        which in 0..2usize,
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        truncate in any::<bool>(),
    ) {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = fixture(["views_legacy.pth", "views_zip.pth"][which]);
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        weights(&bytes, "damaged.pth");
    }

    #[test]
    fn random_pickles_are_errors_or_values(
        ops in prop::collection::vec(
            prop::sample::select(vec![
                b'(', b'N', 0x88, b'K', b']', b'}', b')', b't', b'l', b'd', b'a', b'e', b's',
                b'u', b'q', b'h', 0x94, b'2', b'0', b'1', 0x85, 0x86, 0x87, b'R', b'b', b'Q',
                0x93, 0x8c, b'.', 0xff,
            ]),
            0..400,
        ),
        args in prop::collection::vec(any::<u8>(), 400),
    ) {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Opcodes with a 1-byte argument take the next random byte.
        let mut data = vec![0x80, 2];
        for (op, arg) in ops.iter().zip(&args) {
            data.push(*op);
            if matches!(op, b'K' | b'q' | b'h' | 0x8c) {
                data.push(*arg % 4);
                if *op == 0x8c {
                    data.extend(std::iter::repeat_n(b'a', (*arg % 4) as usize));
                }
            }
        }
        data.push(b'.');
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let _ = effnet::weights::fuzz::pickle(&data);
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        prop_assert!(used <= allowance(data.len()), "{used} bytes for {} bytes", data.len());
        // The same stream inside a zip checkpoint goes through the whole reader.
        let zip = zip_checkpoint(&data, &[], zip::CompressionMethod::Stored);
        weights(&zip, "random.pth");
    }

    #[test]
    fn damaged_safetensors_are_errors(
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let data = vec![1u8; 64];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 4], &data).unwrap();
        let mut bytes = safetensors::tensor::serialize([("w", view)], None).unwrap();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        weights(&bytes, "damaged.safetensors");
    }

    #[test]
    fn damaged_idx_and_cifar_files_are_errors(
        gz in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 4];
        img.extend((0..48).map(|i| i as u8));
        let mut lab = vec![0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2];
        let mut cifar = vec![3u8];
        cifar.extend(std::iter::repeat_n(7u8, 3072));
        for buf in [&mut img, &mut lab, &mut cifar] {
            if gz {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(buf).unwrap();
                *buf = e.finish().unwrap();
            }
            for (at, b) in &flips {
                let i = at.index(buf.len());
                buf[i] ^= b;
            }
            let len = buf.len();
            buf.truncate(cut.index(len + 1).max(len / 2));
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("labels"), &lab).unwrap();
        let labels = dir.path().join("labels");
        read_file(&img, "images", |p| effnet::data::load_idx(p, &labels, None));
        read_file(&cifar, "data_batch_1.bin", |p| {
            effnet::data::load_cifar(&[p.to_path_buf()], effnet::data::Cifar::Ten)
        });
    }
}

#[test]
fn memo_and_nesting_bombs_stop_early() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A list of 10 references to the previous level, 8 levels deep: 10^8 values expanded.
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..8 {
        p.push(b'(');
        p.extend(std::iter::repeat_n([b'h', 0], 10).flatten());
        p.extend([b'l', b'q', 0]);
    }
    p.push(b'.');
    let e = effnet::weights::fuzz::pickle(&p).unwrap_err();
    assert!(e.contains("expands beyond"), "{e}");
    // 10^6 nested lists.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    let e = effnet::weights::fuzz::pickle(&deep).unwrap_err();
    assert!(e.contains("levels of nesting"), "{e}");
    let zip = zip_checkpoint(&deep, &[], zip::CompressionMethod::Stored);
    assert!(
        weights(&zip, "deep.pth")
            .unwrap()
            .contains("levels of nesting")
    );
}

#[test]
fn huge_wrapping_and_negative_views_are_refused() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let storage = 1.5f32.to_le_bytes();
    let check = |pkl: Vec<u8>, needle: &str| {
        let zip = zip_checkpoint(&pkl, &[("0", &storage)], zip::CompressionMethod::Stored);
        let e = weights(&zip, "view.pth").expect("refused");
        assert!(e.contains(needle), "{e}");
        assert_eq!(e.lines().count(), 1);
    };
    // A stride-0 view of 10^12 (and 10^9) elements over one float.
    check(
        tensor_pickle(1, 0, &[1_000_000, 1_000_000], &[0, 0]),
        "more than the file can hold",
    );
    check(
        tensor_pickle(1, 0, &[1_000_000_000], &[0]),
        "more than the file can hold",
    );
    // Strides and offsets that wrap around 2^64.
    check(
        tensor_pickle(1, 0, &[3, 3], &[i64::MAX, i64::MAX]),
        "overflow",
    );
    check(tensor_pickle(1, i64::MAX, &[3], &[i64::MAX]), "overflow");
    check(
        tensor_pickle(1, i64::MAX, &[2], &[1]),
        "view reaches element",
    );
    check(tensor_pickle(1, -1, &[1], &[1]), "bad storage offset");
    // The same view within the storage is fine.
    let zip = zip_checkpoint(
        &tensor_pickle(1, 0, &[3], &[0]),
        &[("0", &storage)],
        zip::CompressionMethod::Stored,
    );
    assert_eq!(weights(&zip, "ok.pth"), None);
}

#[test]
fn decompression_bombs_are_cut_off() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A zip entry that inflates from about 64 KB to 64 MB.
    let zeros = vec![0u8; 64 << 20];
    let zip = zip_checkpoint(
        &tensor_pickle(16 << 20, 0, &[16 << 20], &[1]),
        &[("0", &zeros)],
        zip::CompressionMethod::Deflated,
    );
    drop(zeros);
    assert!(zip.len() < 1 << 20);
    let e = weights(&zip, "bomb.pth").unwrap();
    assert!(e.contains("more than the"), "{e}");
    // A gzipped IDX file whose header promises 10^9 images of 28x28.
    let mut idx = vec![0, 0, 8, 3];
    for d in [1_000_000_000u32, 28, 28] {
        idx.extend(d.to_be_bytes());
    }
    idx.extend(vec![0u8; 1 << 20]);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&idx).unwrap();
    let gz = e.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels");
    std::fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 0]).unwrap();
    let e = read_file(&gz, "images.gz", |p| {
        effnet::data::load_idx(p, &labels, None)
    })
    .unwrap();
    assert!(e.contains("promises"), "{e}");
}

#[test]
fn code_naming_globals_are_refused() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A valid tensor plus a second entry that names os.system.
    let mut p = tensor_pickle(1, 0, &[1], &[1]);
    p.truncate(p.len() - 1); // drop STOP
    p.extend(short_str("x"));
    p.extend(global("os", "system"));
    p.extend(short_str("echo hi"));
    p.extend([0x85, b'R', b's', b'.']);
    let storage = 1.0f32.to_le_bytes();
    let zip = zip_checkpoint(&p, &[("0", &storage)], zip::CompressionMethod::Stored);
    let e = weights(&zip, "evil.pth").unwrap();
    assert!(
        e.contains("`os.system`") && e.contains("weights_only"),
        "{e}"
    );
}
