use super::*;
use crate::agent::config::SensorKind;

fn sensor(name: &str, interval_ms: u64) -> SensorConfig {
    SensorConfig {
        name: name.into(),
        interval: Duration::from_millis(interval_ms),
        field: None,
        unit: None,
        factor: 1.0,
        kind: SensorKind::Thermal { zone: "0".into() },
    }
}

fn config(dir: &Path) -> CommandsConfig {
    let mut outputs = BTreeMap::new();
    outputs.insert(
        "valve".to_string(),
        Output::Gpio {
            path: dir.join("gpio17/value"),
        },
    );
    outputs.insert(
        "pump".to_string(),
        Output::Command {
            run: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("echo \"$0\" >> {}", dir.join("pump.log").display()),
            ],
            values: vec!["on".into(), "off".into()],
            timeout: Duration::from_secs(10),
        },
    );
    CommandsConfig {
        state: dir.join("state/applied.json"),
        desired_topic: "sensors/acme/pi-1/desired".into(),
        reported_topic: "sensors/acme/pi-1/reported".into(),
        min_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(5),
        outputs,
    }
}

async fn open(dir: &Path) -> (Commands, BTreeMap<String, watch::Receiver<Settings>>) {
    std::fs::create_dir_all(dir.join("gpio17")).unwrap();
    std::fs::write(dir.join("gpio17/value"), "0").unwrap();
    Commands::open(
        config(dir),
        &[sensor("pressure", 10_000), sensor("temp", 30_000)],
    )
    .await
    .unwrap()
}

fn doc(version: u64, state: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"version": version, "state": state})).unwrap()
}

#[tokio::test]
async fn a_valid_document_sets_sensors_and_outputs_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, rx) = open(dir.path()).await;
    let r = c
        .handle(&doc(
            1,
            serde_json::json!({"sensors.pressure.interval": "1s", "sensors.temp.enabled": false, "outputs.valve": 1, "outputs.pump": "on"}),
        ))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Applied, "{r:?}");
    assert_eq!((r.version, r.desired_version), (1, 1));
    assert_eq!(
        *rx["pressure"].borrow(),
        Settings {
            interval: Duration::from_secs(1),
            enabled: true
        }
    );
    assert!(!rx["temp"].borrow().enabled);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("gpio17/value")).unwrap(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("pump.log")).unwrap(),
        "on\n"
    );

    // A key left out takes the configured default again; an output keeps its value.
    let r = c
        .handle(&doc(2, serde_json::json!({"sensors.temp.enabled": false})))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Applied);
    assert_eq!(rx["pressure"].borrow().interval, Duration::from_secs(10));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("gpio17/value")).unwrap(),
        "1"
    );

    // A reboot: the kept state is in force again, before any document arrives.
    drop(c);
    std::fs::write(dir.path().join("gpio17/value"), "0").unwrap();
    let (mut c, rx) = Commands::open(
        config(dir.path()),
        &[sensor("pressure", 10_000), sensor("temp", 30_000)],
    )
    .await
    .unwrap();
    assert!(!rx["temp"].borrow().enabled, "the kept state is restored");
    // Seen again after the reconnect: nothing changes, reported again.
    let again = c
        .handle(&doc(2, serde_json::json!({"sensors.temp.enabled": false})))
        .await
        .unwrap();
    assert_eq!((again.status, again.version), (Status::Applied, 2));
}

#[tokio::test]
async fn a_document_with_any_bad_key_is_refused_whole_with_each_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, rx) = open(dir.path()).await;
    let r = c
        .handle(&doc(
            1,
            serde_json::json!({
                "sensors.pressure.interval": "1s",
                "sensors.pressure.interval_ms": 5,
                "sensors.humidity.enabled": true,
                "sensors.temp.interval": "1ms",
                "outputs.valve": 7,
                "outputs.pump": "sideways",
                "outputs.heater": 1,
                "reboot": true,
            }),
        ))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Refused);
    assert_eq!(r.version, 0, "nothing is in force");
    for (key, want) in [
        (
            "sensors.pressure.interval_ms",
            "has no setting `interval_ms`",
        ),
        (
            "sensors.humidity.enabled",
            "unknown sensor `humidity` (this device has: pressure, temp)",
        ),
        ("sensors.temp.interval", "1ms is outside 100ms to 1h"),
        ("outputs.valve", "takes 0 or 1"),
        (
            "outputs.pump",
            "`sideways` is not one of this output's values (on, off)",
        ),
        (
            "outputs.heater",
            "unknown output `heater` (this device has: pump, valve)",
        ),
        ("reboot", "unknown key"),
    ] {
        assert!(
            r.refused.get(key).is_some_and(|w| w.contains(want)),
            "{key}: {:?}",
            r.refused
        );
    }
    assert!(!r.refused.contains_key("sensors.pressure.interval"));
    assert_eq!(
        rx["pressure"].borrow().interval,
        Duration::from_secs(10),
        "nothing changed"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("gpio17/value")).unwrap(),
        "0"
    );
    assert!(!dir.path().join("state/applied.json").exists());
}

#[tokio::test]
async fn an_older_version_is_stale_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, rx) = open(dir.path()).await;
    let r = c
        .handle(&doc(
            5,
            serde_json::json!({"sensors.pressure.interval": "2s"}),
        ))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Applied);
    let r = c
        .handle(&doc(
            4,
            serde_json::json!({"sensors.pressure.interval": "500ms"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.version, r.desired_version),
        (Status::Stale, 5, 4)
    );
    assert!(r.refused["version"].contains("older than version 5"));
    assert_eq!(rx["pressure"].borrow().interval, Duration::from_secs(2));
}

#[tokio::test]
async fn not_a_document_is_refused_and_an_empty_payload_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, _rx) = open(dir.path()).await;
    assert!(c.handle(b"").await.is_none());
    let r = c.handle(b"{\"state\": {}}").await.unwrap();
    assert_eq!(r.status, Status::Refused);
    assert!(
        r.refused["document"].contains("missing field `version`"),
        "{:?}",
        r.refused
    );
}

#[tokio::test]
async fn a_failing_output_is_reported_failed_and_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, _rx) = open(dir.path()).await;
    std::fs::remove_dir_all(dir.path().join("gpio17")).unwrap();
    let r = c
        .handle(&doc(1, serde_json::json!({"outputs.valve": 1})))
        .await
        .unwrap();
    assert_eq!((r.status, r.version), (Status::Failed, 0));
    assert!(
        r.refused["outputs.valve"].contains("cannot write"),
        "{:?}",
        r.refused
    );
    assert!(!dir.path().join("state/applied.json").exists());
}

#[tokio::test]
async fn an_output_changed_by_a_document_that_failed_part_way_is_driven_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("gpio17")).unwrap();
    std::fs::write(dir.path().join("gpio17/value"), "0").unwrap();
    let mut cfg = config(dir.path());
    // Outputs are driven in key order: `zz-lamp` comes after `valve`.
    cfg.outputs.insert(
        "zz-lamp".to_string(),
        Output::Gpio {
            path: dir.path().join("missing/value"),
        },
    );
    let (mut c, _rx) = Commands::open(cfg, &[sensor("pressure", 10_000)])
        .await
        .unwrap();
    let valve = || std::fs::read_to_string(dir.path().join("gpio17/value")).unwrap();
    let r = c
        .handle(&doc(1, serde_json::json!({"outputs.valve": 1})))
        .await
        .unwrap();
    assert_eq!((r.status, valve().as_str()), (Status::Applied, "1"));
    // The valve closes, then the lamp fails: the document fails, version 1 stays in force.
    let r = c
        .handle(&doc(
            2,
            serde_json::json!({"outputs.valve": 0, "outputs.zz-lamp": 1}),
        ))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.version, valve().as_str()),
        (Status::Failed, 1, "0")
    );
    // Version 1's valve value again: it must be driven, though version 1 had it.
    let r = c
        .handle(&doc(3, serde_json::json!({"outputs.valve": 1})))
        .await
        .unwrap();
    assert_eq!((r.status, valve().as_str()), (Status::Applied, "1"));
}

#[tokio::test]
async fn a_kept_state_the_configuration_no_longer_allows_is_not_reported_as_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, _rx) = open(dir.path()).await;
    let d = doc(4, serde_json::json!({"outputs.pump": "on"}));
    assert_eq!(c.handle(&d).await.unwrap().status, Status::Applied);
    drop(c);
    // The pump is no longer configured.
    let mut cfg = config(dir.path());
    cfg.outputs.remove("pump");
    let (mut c, _rx) = Commands::open(cfg, &[sensor("pressure", 10_000)])
        .await
        .unwrap();
    let r = c.handle(&d).await.unwrap();
    assert_eq!((r.status, r.version), (Status::Refused, 4), "{r:?}");
    assert!(
        r.applied.is_empty(),
        "the configured settings are in force: {r:?}"
    );
}
