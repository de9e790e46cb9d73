//! The lake in a local directory. Staged files are `.<name>.inprogress` beside their final
//! name (hidden from readers by name and extension); publishing is a rename, then an fsync of
//! the directory. File I/O is synchronous: a local disk answers in microseconds, and the
//! engine that calls it is one task.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::partition::file_worker;
use super::{Lake, StagedFile, Staging, Upload};

#[derive(Debug, Clone)]
pub struct LocalLake {
    root: PathBuf,
}

impl LocalLake {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn staging_path(&self, key: &str) -> PathBuf {
        let path = self.root.join(key);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.inprogress"))
    }
}

struct LocalStaging(BufWriter<File>);

#[async_trait]
impl Staging for LocalStaging {
    async fn write(&mut self, bytes: Bytes) -> io::Result<()> {
        self.0.write_all(&bytes)
    }

    async fn finish(self: Box<Self>) -> io::Result<Option<Upload>> {
        let file = self.0.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(None)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[async_trait]
impl Lake for LocalLake {
    async fn stage(&self, key: &str) -> io::Result<Box<dyn Staging>> {
        let path = self.staging_path(key);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        Ok(Box::new(LocalStaging(BufWriter::with_capacity(
            1 << 20,
            File::create(path)?,
        ))))
    }

    async fn publish(&self, file: &StagedFile) -> io::Result<()> {
        let staged = self.staging_path(&file.key);
        let target = self.root.join(&file.key);
        match fs::rename(&staged, &target) {
            Ok(()) => sync_dir(target.parent().unwrap_or(&self.root)),
            // Already published by an earlier attempt of the same commit.
            Err(e) if e.kind() == io::ErrorKind::NotFound && target.exists() => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("publishing {}: {e}", file.key),
            )),
        }
    }

    async fn read(&self, key: &str) -> io::Result<Bytes> {
        let path = self.root.join(key);
        fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.root.join(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn remove_orphans(&self, outputs: &[&str], worker: &str) -> io::Result<usize> {
        let mut removed = 0;
        for output in outputs {
            let mut stack = vec![self.root.join(output)];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let entry = entry?;
                    let path = entry.path();
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if entry.file_type()?.is_dir() {
                        stack.push(path);
                    } else if name.ends_with(".inprogress") && file_worker(&name) == Some(worker) {
                        fs::remove_file(&path)?;
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_is_idempotent_and_only_this_workers_orphans_go() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LocalLake::new(dir.path());
        let key = "t/year=2026/month=01/day=01/hour=00/part-0000000001-w0-0000.parquet";
        let mut w = lake.stage(key).await.unwrap();
        w.write(Bytes::from_static(b"data")).await.unwrap();
        assert_eq!(w.finish().await.unwrap(), None);
        let f = StagedFile {
            output: "t".into(),
            key: key.into(),
            rows: 1,
            bytes: 4,
            upload: None,
            stats: None,
        };
        lake.publish(&f).await.unwrap();
        lake.publish(&f).await.unwrap();
        assert_eq!(fs::read(dir.path().join(key)).unwrap(), b"data");
        for worker in ["w0", "w1"] {
            let orphan = format!(
                "t/year=2026/month=01/day=01/hour=00/part-0000000002-{worker}-0000.parquet"
            );
            drop(lake.stage(&orphan).await.unwrap());
        }
        assert_eq!(lake.remove_orphans(&["t"], "w0").await.unwrap(), 1);
        assert_eq!(lake.remove_orphans(&["t"], "w0").await.unwrap(), 0);
        assert_eq!(lake.remove_orphans(&["t"], "w1").await.unwrap(), 1);
        let missing = StagedFile {
            key: "t/nope.parquet".into(),
            ..f
        };
        assert!(lake.publish(&missing).await.is_err());
    }
}
