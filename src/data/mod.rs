//! Datasets for training and evaluation: IDX (MNIST / Fashion-MNIST, optionally gzipped), the
//! CIFAR-10/100 binary format, and image folders (one sub-folder per class).
//!
//! Every loader validates what it reads and reports problems by file name: bad magic numbers,
//! truncated files, image/label count mismatches, labels out of range, empty class folders.

use std::io::Read;
use std::path::{Path, PathBuf};

pub mod augment;
pub mod loader;
pub mod mix;

/// A fixed input of `len` values in [-1, 1) that no runtime can shortcut (not constant, not
/// periodic in any small stride): what the benchmarks feed and what tests use as pixels.
pub fn fixed_pattern(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is corrupt: {why}")]
    Corrupt { path: String, why: String },
    #[error(
        "`{path}`: label {label} of sample {index} is out of range (the dataset has {classes} classes)"
    )]
    LabelOutOfRange {
        path: String,
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("dataset `{path}`: {why}")]
    Invalid { path: String, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> DataError {
    DataError::Corrupt {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Deflate cannot shrink data by more than this factor: a gzip file that claims to hold more is a
/// bomb or corrupt.
const MAX_GZIP_RATIO: usize = 1032;

/// Reads a regular file, transparently gunzipping it when it starts with the gzip magic. The
/// first `header` bytes go to `size`, which returns the total length the file's own header
/// promises; exactly that many bytes are read (never more), so a gzip bomb is cut off where its
/// header says the data ends.
pub fn read_maybe_gz(
    path: &Path,
    header: usize,
    size: impl Fn(&[u8]) -> Result<usize, DataError>,
) -> Result<Vec<u8>, DataError> {
    let raw = crate::util::read_regular(path).map_err(io(path))?;
    let gz = raw.starts_with(&[0x1f, 0x8b]);
    let limit = if gz {
        raw.len().saturating_mul(MAX_GZIP_RATIO)
    } else {
        raw.len()
    };
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(&raw[..]))
    } else {
        Box::new(&raw[..])
    };
    let bad_gz = |e: std::io::Error| corrupt(path, format!("bad gzip stream: {e}"));
    let mut out = Vec::new();
    (&mut reader)
        .take(header as u64)
        .read_to_end(&mut out)
        .map_err(bad_gz)?;
    if out.len() < header {
        return Err(corrupt(path, format!("only {} bytes long", out.len())));
    }
    let total = size(&out)?;
    if total > limit {
        return Err(corrupt(
            path,
            format!(
                "its header promises {total} bytes, more than the {}-byte file can hold (truncated or corrupt)",
                raw.len()
            ),
        ));
    }
    out.reserve_exact(total - header.min(total));
    reader
        .take((total - header.min(total)) as u64 + 1)
        .read_to_end(&mut out)
        .map_err(bad_gz)?;
    if out.len() != total {
        return Err(corrupt(
            path,
            format!(
                "its header promises {total} bytes, the file holds {}{}",
                if out.len() > total { "more" } else { "only " },
                if out.len() > total {
                    String::new()
                } else {
                    out.len().to_string()
                }
            ),
        ));
    }
    Ok(out)
}

/// Images held in memory as 8-bit pixels, `[n][h][w][channels]`, with their labels.
#[derive(Debug, Clone)]
pub struct InMemory {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub class_names: Vec<String>,
}

impl InMemory {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Keeps the first `n` samples.
    pub fn truncate(&mut self, n: usize) {
        let len = self.height * self.width * self.channels;
        self.labels.truncate(n);
        self.pixels.truncate(self.labels.len() * len);
    }

    /// The pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.height * self.width * self.channels;
        &self.pixels[i * len..(i + 1) * len]
    }

    fn check_labels(&self, path: &Path) -> Result<(), DataError> {
        let classes = self.num_classes();
        match self.labels.iter().position(|&l| l as usize >= classes) {
            Some(index) => Err(DataError::LabelOutOfRange {
                path: path.display().to_string(),
                index,
                label: self.labels[index],
                classes,
            }),
            None => Ok(()),
        }
    }
}

/// A file with no header to bound it (CIFAR batches): read whole, a gzipped one decompressed up
/// to the most deflate can hold.
fn read_headerless(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = crate::util::read_regular(path).map_err(io(path))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let limit = raw.len().saturating_mul(MAX_GZIP_RATIO);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(path, format!("bad gzip stream: {e}")))?;
    if out.len() > limit {
        return Err(corrupt(
            path,
            "the gzip stream expands beyond what deflate can hold",
        ));
    }
    Ok(out)
}

/// Says "truncated?" in a short-file error of `what`, as users search for that word.
fn truncated_as(e: DataError, what: &str) -> DataError {
    match e {
        DataError::Corrupt { path, why }
            if why.contains("holds only") || why.contains("bytes long") =>
        {
            DataError::Corrupt {
                path,
                why: format!("{why} ({what} file truncated?)"),
            }
        }
        e => e,
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Loads an IDX image file (magic 0x00000803) and its IDX label file (0x00000801). Without
/// `class_names`, the classes are `0..=max label`.
pub fn load_idx(
    images: &Path,
    labels_path: &Path,
    class_names: Option<Vec<String>>,
) -> Result<InMemory, DataError> {
    let img = read_maybe_gz(images, 16, |head| {
        if be_u32(head, 0) != 0x0803 {
            return Err(corrupt(images, "not an IDX image file (magic 0x00000803)"));
        }
        let (n, h, w) = (be_u32(head, 4), be_u32(head, 8), be_u32(head, 12));
        if h == 0 || w == 0 {
            return Err(corrupt(images, format!("its images are {h}x{w} pixels")));
        }
        (n as usize)
            .checked_mul(h as usize * w as usize)
            .and_then(|v| v.checked_add(16))
            .ok_or_else(|| corrupt(images, "absurd dimensions"))
    })
    .map_err(|e| truncated_as(e, "images"))?;
    let lab = read_maybe_gz(labels_path, 8, |head| {
        if be_u32(head, 0) != 0x0801 {
            return Err(corrupt(
                labels_path,
                "not an IDX label file (magic 0x00000801)",
            ));
        }
        Ok(8 + be_u32(head, 4) as usize)
    })
    .map_err(|e| truncated_as(e, "labels"))?;
    let (n, h, w) = (
        be_u32(&img, 4) as usize,
        be_u32(&img, 8) as usize,
        be_u32(&img, 12) as usize,
    );
    let ln = be_u32(&lab, 4) as usize;
    if ln != n {
        return Err(DataError::Invalid {
            path: labels_path.display().to_string(),
            why: format!("{ln} labels for {n} images in `{}`", images.display()),
        });
    }
    let labels: Vec<u32> = lab[8..].iter().map(|&l| l as u32).collect();
    let class_names = class_names.unwrap_or_else(|| {
        let classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
        (0..classes).map(|c| format!("class {c}")).collect()
    });
    let data = InMemory {
        pixels: img[16..].to_vec(),
        labels,
        height: h,
        width: w,
        channels: 1,
        class_names,
    };
    data.check_labels(labels_path)?;
    Ok(data)
}

/// The Fashion-MNIST class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// MNIST-style IDX files (`train-images-idx3-ubyte[.gz]`, ...) under `dir`; `class_names` as in
/// [`load_idx`].
pub fn load_mnist_dir(
    dir: &Path,
    train: bool,
    class_names: Option<Vec<String>>,
) -> Result<InMemory, DataError> {
    let prefix = if train { "train" } else { "t10k" };
    let find = |kind: &str| -> Result<PathBuf, DataError> {
        let base = format!("{prefix}-{kind}");
        [dir.join(&base), dir.join(format!("{base}.gz"))]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| DataError::Invalid {
                path: dir.display().to_string(),
                why: format!("no `{base}` or `{base}.gz` (install Debian's dataset-fashion-mnist)"),
            })
    };
    load_idx(
        &find("images-idx3-ubyte")?,
        &find("labels-idx1-ubyte")?,
        class_names,
    )
}

/// Fashion-MNIST with its class names (from Debian's package by default).
pub fn load_fashion_mnist(dir: &Path, train: bool) -> Result<InMemory, DataError> {
    let names = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    load_mnist_dir(dir, train, Some(names))
}

/// Gives two splits the same class list (the longer one), e.g. when a test split lacks a class.
pub fn unify_classes(a: &mut InMemory, b: &mut InMemory) {
    if a.class_names.len() < b.class_names.len() {
        a.class_names = b.class_names.clone();
    } else {
        b.class_names = a.class_names.clone();
    }
}

/// CIFAR binary flavours: CIFAR-10 records are `label, 3072 pixels`; CIFAR-100 `coarse, fine, 3072`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

/// Loads CIFAR binary batch files (channel-planar 32x32 records) into HWC pixels.
pub fn load_cifar(files: &[PathBuf], kind: Cifar) -> Result<InMemory, DataError> {
    let (label_bytes, classes) = match kind {
        Cifar::Ten => (1, 10),
        Cifar::Hundred => (2, 100),
    };
    let record = label_bytes + 3072;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = read_headerless(path)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            return Err(corrupt(
                path,
                format!(
                    "{} bytes is not a whole number of {record}-byte CIFAR records (truncated?)",
                    bytes.len()
                ),
            ));
        }
        for (i, r) in bytes.chunks_exact(record).enumerate() {
            let label = r[label_bytes - 1] as u32;
            if label as usize >= classes {
                return Err(DataError::LabelOutOfRange {
                    path: path.display().to_string(),
                    index: i,
                    label,
                    classes,
                });
            }
            labels.push(label);
            let planes = &r[label_bytes..];
            for p in 0..1024 {
                pixels.extend([planes[p], planes[1024 + p], planes[2048 + p]]);
            }
        }
    }
    Ok(InMemory {
        pixels,
        labels,
        height: 32,
        width: 32,
        channels: 3,
        class_names: (0..classes).map(|c| format!("class {c}")).collect(),
    })
}

/// An image folder: `root/<class>/<image>`; classes sorted by name (as torchvision's ImageFolder).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub samples: Vec<(PathBuf, u32)>,
    pub class_names: Vec<String>,
}

const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Whether `path` names an image file by its extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Folder levels [`image_files`] descends (a guard against link cycles).
const MAX_FOLDER_DEPTH: usize = 32;

/// The image files among `paths`: files as given (in order), folders walked recursively for image
/// files, each folder's files sorted by path.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
        if depth > MAX_FOLDER_DEPTH {
            return Err(DataError::Invalid {
                path: dir.display().to_string(),
                why: format!("folders nest deeper than {MAX_FOLDER_DEPTH} levels"),
            });
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, depth + 1, out)?;
            } else if p.is_file() && is_image(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, 0, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub fn load_image_folder(root: &Path) -> Result<ImageFolder, DataError> {
    let invalid = |why: String| DataError::Invalid {
        path: root.display().to_string(),
        why,
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(invalid("no class sub-folders".into()));
    }
    let mut samples = Vec::new();
    let mut class_names = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        if files.is_empty() {
            return Err(invalid(format!(
                "class folder `{}` has no images",
                dir.display()
            )));
        }
        files.sort();
        samples.extend(files.into_iter().map(|f| (f, label as u32)));
        class_names.push(
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(ImageFolder {
        samples,
        class_names,
    })
}

/// An image folder whose every file's header was read (so a corrupt or unsupported file fails
/// before training starts rather than in the middle of an epoch).
fn checked_folder(dir: &Path) -> Result<ImageFolder, DataError> {
    let f = load_image_folder(dir)?;
    for (path, _) in &f.samples {
        crate::preprocess::image_dimensions(path).map_err(|e| DataError::Invalid {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    }
    Ok(f)
}

/// One split of a dataset: decoded into memory (IDX, CIFAR) or image files that the loader
/// streams (folders).
#[derive(Debug, Clone)]
pub enum Split {
    Memory(InMemory),
    Folder(ImageFolder),
}

impl Split {
    pub fn len(&self) -> usize {
        match self {
            Split::Memory(m) => m.len(),
            Split::Folder(f) => f.samples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn class_names(&self) -> &[String] {
        match self {
            Split::Memory(m) => &m.class_names,
            Split::Folder(f) => &f.class_names,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.class_names().len()
    }

    /// Keeps the first `n` samples.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Split::Memory(m) => m.truncate(n),
            Split::Folder(f) => f.samples.truncate(n),
        }
    }
}

fn cifar_files(dir: &Path, train: bool, kind: Cifar) -> Vec<PathBuf> {
    match (kind, train) {
        (Cifar::Ten, true) => (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .collect(),
        (Cifar::Ten, false) => vec![dir.join("test_batch.bin")],
        (Cifar::Hundred, true) => vec![dir.join("train.bin")],
        (Cifar::Hundred, false) => vec![dir.join("test.bin")],
    }
}

/// The (train, eval) splits a dataset name stands for: `fashion-mnist`, `idx:DIR`, `cifar10:DIR`,
/// `cifar100:DIR`, or an image folder with `train/` and `val/` (streamed from the files).
pub fn named(dataset: &str) -> Result<(Split, Split), DataError> {
    let (kind, path) = dataset.split_once(':').unwrap_or(("", dataset));
    let memory = |(a, b)| (Split::Memory(a), Split::Memory(b));
    Ok(match (kind, path) {
        ("", "fashion-mnist") => {
            let dir = Path::new(FASHION_MNIST_DIR);
            memory((
                load_fashion_mnist(dir, true)?,
                load_fashion_mnist(dir, false)?,
            ))
        }
        ("idx", dir) => {
            let mut train = load_mnist_dir(Path::new(dir), true, None)?;
            let mut eval = load_mnist_dir(Path::new(dir), false, None)?;
            unify_classes(&mut train, &mut eval);
            memory((train, eval))
        }
        ("cifar10" | "cifar100", dir) => {
            let k = if kind == "cifar10" {
                Cifar::Ten
            } else {
                Cifar::Hundred
            };
            let dir = Path::new(dir);
            memory((
                load_cifar(&cifar_files(dir, true, k), k)?,
                load_cifar(&cifar_files(dir, false, k), k)?,
            ))
        }
        ("", dir) if Path::new(dir).is_dir() => {
            let dir = Path::new(dir);
            let train = checked_folder(&dir.join("train"))?;
            let val = checked_folder(&dir.join("val"))?;
            if train.class_names != val.class_names {
                return Err(DataError::Invalid {
                    path: dir.display().to_string(),
                    why: "train/ and val/ have different class folders".into(),
                });
            }
            (Split::Folder(train), Split::Folder(val))
        }
        _ => {
            return Err(DataError::Invalid {
                path: dataset.to_string(),
                why: "unknown dataset: use fashion-mnist, idx:DIR, cifar10:DIR, cifar100:DIR or an image folder with train/ and val/".into(),
            });
        }
    })
}

/// The evaluation split alone (image folders: `val/` only; the caller's [`loader::Prepared`]
/// applies the weights' eval transform).
pub fn eval_split(dataset: &str) -> Result<Split, DataError> {
    let (kind, path) = dataset.split_once(':').unwrap_or(("", dataset));
    Ok(match (kind, path) {
        ("", "fashion-mnist") => {
            Split::Memory(load_fashion_mnist(Path::new(FASHION_MNIST_DIR), false)?)
        }
        ("idx", dir) => Split::Memory(load_mnist_dir(Path::new(dir), false, None)?),
        ("cifar10" | "cifar100", dir) => {
            let k = if kind == "cifar10" {
                Cifar::Ten
            } else {
                Cifar::Hundred
            };
            Split::Memory(load_cifar(&cifar_files(Path::new(dir), false, k), k)?)
        }
        ("", dir) if Path::new(dir).is_dir() => {
            Split::Folder(checked_folder(&Path::new(dir).join("val"))?)
        }
        _ => return named(dataset).map(|(_, eval)| eval),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(n: u32, h: u32, w: u32, pixels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 3];
        for d in [n, h, w] {
            v.extend(d.to_be_bytes());
        }
        v.extend(pixels);
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 1];
        v.extend((labels.len() as u32).to_be_bytes());
        v.extend(labels);
        v
    }

    #[test]
    fn idx_round_trip_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        std::fs::write(
            dir.path().join("train-images-idx3-ubyte"),
            idx_images(2, 3, 4, &pixels),
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&idx_labels(&[7, 2])).unwrap();
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        let d = load_fashion_mnist(dir.path(), true).unwrap();
        assert_eq!((d.len(), d.height, d.width, d.channels), (2, 3, 4, 1));
        assert_eq!(d.labels, vec![7, 2]);
        assert_eq!(d.image(1), &pixels[12..24]);
        assert_eq!(d.class_names[7], "Sneaker");
    }

    #[test]
    fn idx_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = (dir.path().join("i"), dir.path().join("l"));
        let names = || Some((0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        std::fs::write(&img, idx_images(2, 2, 2, &[0; 7])).unwrap();
        std::fs::write(&lab, idx_labels(&[1, 2])).unwrap();
        assert!(
            load_idx(&img, &lab, names())
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        std::fs::write(&img, idx_images(2, 2, 2, &[0; 8])).unwrap();
        std::fs::write(&lab, idx_labels(&[1, 12])).unwrap();
        let e = load_idx(&img, &lab, names()).unwrap_err().to_string();
        assert!(e.contains("label 12 of sample 1 is out of range"), "{e}");
        std::fs::write(&lab, idx_labels(&[1])).unwrap();
        assert!(
            load_idx(&img, &lab, names())
                .unwrap_err()
                .to_string()
                .contains("1 labels for 2 images")
        );
        std::fs::write(&lab, b"garbage!").unwrap();
        assert!(
            load_idx(&img, &lab, names())
                .unwrap_err()
                .to_string()
                .contains("not an IDX label file")
        );
        std::fs::write(&lab, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(
            load_idx(&img, &lab, names())
                .unwrap_err()
                .to_string()
                .contains("bad gzip")
        );
    }

    #[test]
    fn cifar_records_become_hwc_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![3u8];
        rec.extend(std::iter::repeat_n(10u8, 1024));
        rec.extend(std::iter::repeat_n(20u8, 1024));
        rec.extend(std::iter::repeat_n(30u8, 1024));
        let path = dir.path().join("data_batch_1.bin");
        std::fs::write(&path, [rec.clone(), rec.clone()].concat()).unwrap();
        let d = load_cifar(std::slice::from_ref(&path), Cifar::Ten).unwrap();
        assert_eq!((d.len(), d.labels[1]), (2, 3));
        assert_eq!(&d.image(0)[..6], &[10, 20, 30, 10, 20, 30]);
        // CIFAR-100: the fine label is the second byte.
        let mut rec100 = vec![1u8, 77];
        rec100.extend(std::iter::repeat_n(0u8, 3072));
        std::fs::write(&path, &rec100).unwrap();
        assert_eq!(
            load_cifar(std::slice::from_ref(&path), Cifar::Hundred)
                .unwrap()
                .labels,
            vec![77]
        );
        // Truncated file and out-of-range label.
        std::fs::write(&path, &rec[..100]).unwrap();
        assert!(
            load_cifar(std::slice::from_ref(&path), Cifar::Ten)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        rec[0] = 10;
        std::fs::write(&path, &rec).unwrap();
        assert!(
            load_cifar(&[path], Cifar::Ten)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
    }

    #[test]
    fn image_folder_classes_and_empty_folders() {
        let dir = tempfile::tempdir().unwrap();
        for (class, files) in [("cat", vec!["a.png", "b.JPG"]), ("dog", vec!["c.png"])] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for f in files {
                std::fs::write(dir.path().join(class).join(f), b"x").unwrap();
            }
        }
        std::fs::write(dir.path().join("dog").join("notes.txt"), b"x").unwrap();
        let f = load_image_folder(dir.path()).unwrap();
        assert_eq!(f.class_names, vec!["cat", "dog"]);
        assert_eq!(
            f.samples.iter().map(|s| s.1).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let e = load_image_folder(dir.path()).unwrap_err().to_string();
        assert!(e.contains("has no images") && e.contains("empty"), "{e}");
    }

    #[test]
    fn the_real_fashion_mnist_when_installed() {
        let dir = Path::new(FASHION_MNIST_DIR);
        if !dir.exists() {
            eprintln!("skipping: {FASHION_MNIST_DIR} not installed (run ./setup.sh)");
            return;
        }
        let test = load_fashion_mnist(dir, false).unwrap();
        assert_eq!((test.len(), test.height, test.width), (10_000, 28, 28));
        let mut counts = [0usize; 10];
        test.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c == 1000), "{counts:?}");
    }
}
