//! The lake in a local directory. Staged files are `.<name>.inprogress` beside their final
//! name (hidden from readers by name and extension); publishing is a rename, then an fsync of
//! the directory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{Lake, StagedFile, Staging};

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

impl Write for LocalStaging {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Staging for LocalStaging {
    fn finish(self: Box<Self>) -> io::Result<()> {
        let file = self.0.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Lake for LocalLake {
    fn stage(&self, key: &str) -> io::Result<Box<dyn Staging>> {
        let path = self.staging_path(key);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        Ok(Box::new(LocalStaging(BufWriter::with_capacity(
            1 << 20,
            File::create(path)?,
        ))))
    }

    fn publish(&self, file: &StagedFile) -> io::Result<()> {
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

    fn remove_orphans(&self, outputs: &[&str]) -> io::Result<usize> {
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
                    if entry.file_type()?.is_dir() {
                        stack.push(path);
                    } else if path.to_string_lossy().ends_with(".inprogress") {
                        fs::remove_file(&path)?;
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }

    fn table_url(&self, output: &str) -> String {
        let abs =
            std::path::absolute(self.root.join(output)).unwrap_or_else(|_| self.root.join(output));
        format!("{}/", abs.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_is_idempotent_and_orphans_go() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LocalLake::new(dir.path());
        let key = "t/year=2026/month=01/day=01/hour=00/part-1.parquet";
        let mut w = lake.stage(key).unwrap();
        w.write_all(b"data").unwrap();
        w.finish().unwrap();
        let f = StagedFile {
            output: "t".into(),
            key: key.into(),
            rows: 1,
            bytes: 4,
        };
        lake.publish(&f).unwrap();
        lake.publish(&f).unwrap();
        assert_eq!(fs::read(dir.path().join(key)).unwrap(), b"data");
        let orphan = lake
            .stage("t/year=2026/month=01/day=01/hour=00/part-2.parquet")
            .unwrap();
        drop(orphan);
        assert_eq!(lake.remove_orphans(&["t"]).unwrap(), 1);
        let missing = StagedFile {
            key: "t/nope.parquet".into(),
            ..f
        };
        assert!(lake.publish(&missing).is_err());
    }
}
