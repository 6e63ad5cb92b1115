//! Hot reload under load, over real sockets: requests running through a reload (routes and keys
//! changed) all succeed, each answered under exactly one of the two configurations, never back
//! to the old one; existing keep-alive connections move to the new configuration (a removed key
//! stops working on them at once); a bad file changes nothing.

use crate::harness::client::{post, Client};
use crate::harness::Gateway;
use lmgate::proxy::Proxy;
use lmgate::reload::{self, Source};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A config routing `m` to the mock, renamed to `model` (the mock answers with that name), and
/// accepting `keys`.
fn config(model: &str, keys: &[&str]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "[connections.mk]\napi_type = \"mock\"\n[routing]\n\"m\" = \"mk.{model}\"\n[groups.g]\napi_keys = [{}]\n",
        keys.join(", ")
    )
}

/// A config file in the temp directory, removed when dropped.
struct File(PathBuf);

impl File {
    fn new(name: &str) -> File {
        File(std::env::temp_dir().join(format!("lmgate-reload-{}-{name}.toml", std::process::id())))
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("write the config");
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One request on a keep-alive connection: its status and the model that answered.
async fn ask(c: &mut Client, key: &str) -> (u16, String) {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    c.send(&post("/v1/chat/completions", &[("authorization", &format!("Bearer {key}"))], body)).await;
    let r = c.response().await;
    let model =
        if r.status() == 200 { r.json()["model"].as_str().unwrap_or_default().to_owned() } else { String::new() };
    (r.status(), model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request_and_moves_every_connection_to_the_new_config() {
    let file = File::new("load");
    file.write(&config("model-a", &["k-both", "k-old"]));
    let source = Source { config: file.0.clone(), env: Some(String::new()) };
    let proxy = Arc::new(Proxy::new(source.load().expect("config A")).expect("proxy"));
    let gw = Gateway::serve(proxy.clone());

    // A keep-alive connection with the key that the new config removes.
    let mut old_key = Client::connect(gw.addr).await;
    assert_eq!(ask(&mut old_key, "k-old").await, (200, "model-a".into()));

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, addr) = (stop.clone(), gw.addr);
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    seen.push(ask(&mut c, "k-both").await);
                }
                // One more after the reload is certainly stored: on the same connection.
                seen.push(ask(&mut c, "k-both").await);
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    file.write(&config("model-b", &["k-both", "k-new"]));
    assert_eq!(reload::reload(&proxy, &source), Ok(vec![]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for task in load {
        let seen = task.await.expect("a load task");
        total += seen.len();
        assert!(seen.iter().all(|(status, _)| *status == 200), "a request failed: {seen:?}");
        let first_b = seen.iter().position(|(_, m)| m == "model-b").expect("the new config answered");
        assert!(seen[..first_b].iter().all(|(_, m)| m == "model-a"), "{seen:?}");
        assert!(seen[first_b..].iter().all(|(_, m)| m == "model-b"), "never back to the old config: {seen:?}");
        assert!(first_b > 0, "the old config answered before the reload");
    }
    println!("requests through the reload: {total}, failed: 0");
    assert!(total > 20, "{total} requests");

    // The removed key stops working on the connection that used it; the new one works there.
    assert_eq!(ask(&mut old_key, "k-old").await.0, 401);
    assert_eq!(ask(&mut old_key, "k-new").await, (200, "model-b".into()));

    // A bad file changes nothing.
    file.write(&config("model-c", &["k-both"]).replace("mk.model-c", "nowhere.model-c"));
    let e = reload::reload(&proxy, &source).expect_err("an invalid config");
    assert!(e.contains("no connection named `nowhere`") && e.contains("lmgate-reload"), "{e}");
    assert_eq!(ask(&mut old_key, "k-new").await, (200, "model-b".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_keys_are_kept_on_reload_and_named() {
    let file = File::new("kept");
    file.write(&config("model-a", &["k"]));
    let source = Source { config: file.0.clone(), env: Some(String::new()) };
    let proxy = Arc::new(Proxy::new(source.load().expect("config")).expect("proxy"));
    file.write(&format!("[server]\nlisten = \"127.0.0.1:1\"\nmax_connections = 7\n{}", config("model-b", &["k"])));
    assert_eq!(reload::reload(&proxy, &source), Ok(vec!["listen", "max_connections"]));
    let cfg = proxy.config();
    assert_eq!((cfg.server.listen.port(), cfg.server.max_connections), (4000, 10_000));
    assert_eq!(cfg.router.routes()[0].targets[0].label.as_ref(), "mk.model-b", "the rest is applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_open_a_public_listener_by_dropping_every_key() {
    let file = File::new("public");
    file.write(&format!("[server]\nlisten = \"0.0.0.0:4000\"\n{}", config("model-a", &["k"])));
    let source = Source { config: file.0.clone(), env: Some(String::new()) };
    let proxy = Arc::new(Proxy::new(source.load().expect("config")).expect("proxy"));
    // No keys and no `listen` line: valid on its own (the default listen is loopback), but the
    // public listener is kept, so the file would open it to anyone.
    file.write("[connections.mk]\napi_type = \"mock\"\n[routing]\n\"m\" = \"mk.model-b\"\n");
    let e = reload::reload(&proxy, &source).expect_err("an open public listener");
    assert!(e.contains("no client keys") && e.contains("0.0.0.0:4000"), "{e}");
    let cfg = proxy.config();
    assert!(cfg.open_group.is_none(), "the keys still apply");
    assert_eq!(cfg.router.routes()[0].targets[0].label.as_ref(), "mk.model-a", "nothing changed");
    // Running open on purpose is a choice the file can make.
    file.write("[server]\nopen = true\n[connections.mk]\napi_type = \"mock\"\n[routing]\n\"m\" = \"mk.model-b\"\n");
    assert_eq!(reload::reload(&proxy, &source), Ok(vec!["listen"]));
    assert!(proxy.config().open_group.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_cooldown_by_name_and_drops_it_when_the_connection_changed() {
    use crate::harness::upstream::{json, response, Step, Upstream};
    let mut limited =
        Upstream::start(|_| vec![Step::Write(response(429, "application/json", &[("retry-after", "60")], "{}"))]).await;
    let fine = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let (limited_addr, fine_addr) = (limited.addr, fine.addr);
    let text = |key: &str| {
        format!(
            "[connections.limited]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"{key}\"\n\
             [connections.fine]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\n\
             [routing]\n\"m\" = {{ targets = [\"limited.m\", \"fine.m\"], strategy = \"ordered\" }}\n",
            limited_addr, fine_addr
        )
    };
    let file = File::new("cooldown");
    file.write(&text("sk-1"));
    let source = Source { config: file.0.clone(), env: Some(String::new()) };
    let proxy = Arc::new(Proxy::new(source.load().expect("config")).expect("proxy"));
    let gw = Gateway::serve(proxy.clone());
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let ask = || async { crate::harness::client::exchange(gw.addr, &post("/v1/chat/completions", &[], body)).await };
    assert_eq!(ask().await.status(), 200);
    assert!(limited.try_request().is_some(), "the primary was asked and answered 429");
    // The same file again: the cooldown (Retry-After 60) is kept, the primary is not asked.
    assert_eq!(reload::reload(&proxy, &source), Ok(vec![]));
    assert_eq!(ask().await.status(), 200);
    assert!(limited.try_request().is_none(), "the cooldown survived the reload");
    // A new key for the primary: a different upstream to the gateway, asked again at once.
    file.write(&text("sk-2"));
    assert_eq!(reload::reload(&proxy, &source), Ok(vec![]));
    assert_eq!(ask().await.status(), 200);
    assert!(limited.try_request().is_some(), "a changed connection starts without the old cooldown");
}
