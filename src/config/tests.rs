//! The config file read as the daemon reads it: defaults, typed values, refusals.

use super::*;

#[test]
fn empty_config_is_valid_defaults() {
    let c: Config = toml::from_str("").unwrap();
    c.validate().unwrap();
    assert_eq!(c.engine.chunk_size, 1 << 20);
}

#[test]
fn values_are_typed_as_read() {
    let c: Config = toml::from_str(
        "[engine]\nfill_after_idle_ms = 0\nread_ahead_max = 0\ndrop_behind = 0\nahead_buffer_max = 0\nfailed_fetch_hold_ms = 250\ninflight_capacity = 3\n\
         busy_poll_us = 0\n[daemon]\ncache_limit_bytes = 0\n[registry]\ndeadline_ms = 1500\nmin_rate_kib_s = 0\nplatform = 'linux/arm64/v8'",
    )
    .unwrap();
    assert_eq!(c.engine.fill_after_idle, None);
    assert_eq!(c.engine.read_ahead_max, None);
    assert_eq!(c.engine.drop_behind, None, "0: never");
    assert_eq!(c.engine.ahead_buffer_max, None, "0: no bound");
    assert_eq!(c.engine.failed_fetch_hold, Some(Duration::from_millis(250)));
    assert_eq!(c.engine.completed_chunks_kept, 3, "the old key still reads");
    assert_eq!(c.engine.busy_poll, None);
    assert_eq!(EngineConfig::default().busy_poll, Some(Duration::from_micros(50)));
    assert_eq!(c.daemon.cache_limit_bytes, None);
    assert_eq!(c.registry.deadline, Duration::from_millis(1500));
    assert_eq!(c.registry.min_rate_kib_s, None);
    assert_eq!(c.registry.platform.unwrap().to_string(), "linux/arm64/v8");
    assert!(toml::from_str::<Config>("[registry]\nplatform = 'linux'").is_err());
    let c: Config = toml::from_str("[prefetch]\nrecord_window_ms = 0\nfrom_registry = false").unwrap();
    assert_eq!(
        (c.prefetch.record_window, c.prefetch.replay, c.prefetch.from_registry),
        (None, true, false)
    );
    assert_eq!(Config::default().prefetch.record_window, Some(Duration::from_secs(30)));
    let c: Config = toml::from_str("[[registry.hosts]]\nhost='a'\ninsecure=true\nca_file='/ca.pem'").unwrap();
    assert!(c.validate().is_err(), "plain HTTP with a CA file");
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lazyblob.toml");
    let c = Config::load(&path).unwrap();
    assert!(!c.registry.hosts.is_empty());
}

#[test]
fn bad_values_are_rejected() {
    let c: Config = toml::from_str("[engine]\nchunk_size = 1000").unwrap();
    assert!(c.validate().is_err());
    assert!(toml::from_str::<Config>("[engine]\nno_such = 1").is_err());
    for groups in [0, MAX_FANOTIFY_GROUPS + 1] {
        let c: Config = toml::from_str(&format!("[engine]\nfanotify_groups = {groups}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("fanotify_groups"), "{e}");
    }
    let c: Config = toml::from_str("[[registry.hosts]]\nhost='a'\ntoken='t'\nusername='u'").unwrap();
    assert!(c.validate().is_err());
}

#[test]
fn debug_redacts_credentials() {
    let c: Config = toml::from_str("[[registry.hosts]]\nhost='a'\nusername='u'\npassword='hunter2'").unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
}
