//! Acknowledgements of alerts, kept where they survive a console restart and are seen by
//! every console serving the pipeline: one small JSON file per acknowledged alert, named by
//! the alert's id, created only if absent (so the first acknowledgement stands, whichever
//! console took it).
//!
//! They live beside the lake, under `<lake>/_console/acks/` of the alerts output's lake
//! (a local lake). A console over an S3 lake keeps them in a local directory given with
//! `--state` until the S3 store lands (conditional `PutObject` with `If-None-Match: *` is the
//! same rule).

use std::io;
use std::path::PathBuf;

use super::fleet::Ack;

#[derive(Debug, Clone)]
pub struct AckStore {
    dir: PathBuf,
}

impl AckStore {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Every acknowledgement kept.
    pub fn load(&self) -> io::Result<Vec<Ack>> {
        let mut acks = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match serde_json::from_slice::<Ack>(&std::fs::read(&path)?) {
                Ok(a) => acks.push(a),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "an acknowledgement file does not parse; skipped")
                }
            }
        }
        acks.sort_by_key(|a| a.at_us);
        Ok(acks)
    }

    /// Keeps `ack` unless the alert was acknowledged already; returns the acknowledgement
    /// that stands.
    pub fn put(&self, ack: &Ack) -> io::Result<Ack> {
        // Ids are hex (see `live::alert_id`); anything else never names a file.
        if ack.alert.is_empty() || !ack.alert.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an alert id",
            ));
        }
        let path = self.dir.join(format!("{}.json", ack.alert));
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", ack.alert, std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(ack)?)?;
        // A hard link fails if the target exists: the first acknowledgement stays.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(ack.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_acknowledgement_stands_and_survives() {
        let dir = tempfile::tempdir().unwrap();
        let store = AckStore::new(dir.path().join("acks")).unwrap();
        let ack = |by: &str| Ack {
            alert: "ab12".into(),
            by: by.into(),
            at_us: 1,
            version: 0,
        };
        assert_eq!(store.put(&ack("ann")).unwrap().by, "ann");
        assert_eq!(store.put(&ack("bob")).unwrap().by, "ann");
        let again = AckStore::new(dir.path().join("acks")).unwrap();
        assert_eq!(again.load().unwrap(), vec![ack("ann")]);
        assert!(
            store
                .put(&Ack {
                    alert: "../x".into(),
                    ..ack("eve")
                })
                .is_err()
        );
    }
}
