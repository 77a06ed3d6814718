//! The browser session pool and the chromedriver process behind it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_workflows::adapter::{AdapterError, AdapterResult};
use thirtyfour::prelude::*;
use thirtyfour::{ChromeCapabilities, ChromiumLikeCapabilities};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// Pool and browser settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most browser sessions alive at once.
    pub size: usize,
    /// A session is quit and replaced after this many adapter calls.
    pub max_uses: u32,
    /// Use this WebDriver server (e.g. a Selenium Grid) instead of starting chromedriver.
    pub webdriver_url: Option<String>,
    /// The chromedriver binary Bulwark starts when `webdriver_url` is absent.
    pub chromedriver: PathBuf,
    /// The Chromium binary (absent: chromedriver's default).
    pub chromium: Option<PathBuf>,
    /// Browser window size (the default 800×600 lets sticky bars cover click targets).
    pub window: (u32, u32),
}

impl Default for PoolConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            // The browser path is CPU-bound: about one active browser per core.
            size: cores.clamp(1, 8),
            max_uses: 200,
            webdriver_url: None,
            chromedriver: PathBuf::from("/usr/bin/chromedriver"),
            chromium: Some(PathBuf::from("/usr/bin/chromium")),
            window: (1366, 900),
        }
    }
}

impl PoolConfig {
    /// Defaults, overridden by `BULWARK_WEBDRIVER_URL`, `BULWARK_CHROMEDRIVER`,
    /// `BULWARK_CHROMIUM` and `BULWARK_WEBDRIVER_POOL` (the size) when set.
    pub fn from_env() -> Self {
        let mut c = Self::default();
        if let Ok(u) = std::env::var("BULWARK_WEBDRIVER_URL")
            && !u.is_empty()
        {
            c.webdriver_url = Some(u);
        }
        if let Ok(p) = std::env::var("BULWARK_CHROMEDRIVER") {
            c.chromedriver = p.into();
        }
        if let Ok(p) = std::env::var("BULWARK_CHROMIUM") {
            c.chromium = Some(p.into());
        }
        if let Some(n) = std::env::var("BULWARK_WEBDRIVER_POOL")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            c.size = n;
        }
        c
    }
}

impl PoolConfig {
    /// Whether browser endpoints can run with this configuration: a WebDriver URL is
    /// given, or both the chromedriver and Chromium binaries exist. The error says how to
    /// enable them (for `bulwark demo` and similar callers).
    pub fn check_available(&self) -> Result<(), String> {
        if self.webdriver_url.is_some() {
            return Ok(());
        }
        let mut missing = Vec::new();
        if !self.chromedriver.exists() {
            missing.push(format!("chromedriver ({})", self.chromedriver.display()));
        }
        if let Some(c) = &self.chromium
            && !c.exists()
        {
            missing.push(format!("Chromium ({})", c.display()));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "browser endpoints are disabled: {} not found. Install them with                  `sudo apt-get install chromium chromium-driver` (Debian/Ubuntu), point                  BULWARK_CHROMEDRIVER / BULWARK_CHROMIUM at existing binaries, or set                  BULWARK_WEBDRIVER_URL to a running WebDriver server",
                missing.join(" and ")
            ))
        }
    }
}

/// Counters of a pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Browser sessions started.
    pub started: AtomicU64,
    /// Sessions quit (recycled, discarded or at shutdown).
    pub quit: AtomicU64,
    /// Times a call got an idle session back.
    pub reused: AtomicU64,
}

struct DriverProcess {
    url: String,
    _child: Option<tokio::process::Child>,
    /// Its process group's lock (see the reaper): held while this process lives.
    group: Option<super::reaper::GroupLock>,
    pgid: Option<u32>,
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        // chromedriver and every Chromium it started: the whole group.
        if let Some(pid) = self
            .pgid
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        self.group.take();
    }
}

/// One browser session.
pub(crate) struct Session {
    pub(crate) driver: WebDriver,
    /// Portals (pool keys) this session is logged in to: one browser keeps the cookies
    /// of several portals at once.
    pub(crate) logged_in: Vec<String>,
    uses: u32,
    _profile: tempfile::TempDir,
    /// Selectors of fields that received secrets (cleared before any capture).
    pub(crate) secret_fields: Vec<String>,
}

/// A session lent to one adapter call; give it back with [`WebDriverPool::release`].
pub(crate) struct Lease {
    pub(crate) session: Option<Session>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<PoolInner>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A call dropped mid-flight (deadline, cancelled task): quit its browser off the
        // caller's path; never let thirtyfour's blocking teardown run on the executor.
        if let Some(s) = self.session.take() {
            let stats = self.pool.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = s.driver.quit().await;
                    stats.stats.quit.fetch_add(1, Ordering::Relaxed);
                });
            } else {
                std::thread::spawn(move || quit_off_executor(vec![s]));
            }
        }
    }
}

struct PoolInner {
    config: PoolConfig,
    driver: tokio::sync::OnceCell<DriverProcess>,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Session>>,
    stats: PoolStats,
}

/// A pool of headless Chromium sessions shared by every webdriver adapter built from one
/// factory. chromedriver is started lazily on first use (on a free loopback port) and
/// stopped when the pool is dropped; call [`WebDriverPool::shutdown`] to quit the
/// browsers cleanly first.
#[derive(Clone)]
pub struct WebDriverPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for WebDriverPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebDriverPool")
            .field("config", &self.inner.config)
            .finish()
    }
}

fn transient(what: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Transient(format!("webdriver: {what}: {e}"))
}

impl WebDriverPool {
    /// A pool; nothing starts until the first session is needed.
    pub fn new(config: PoolConfig) -> Self {
        let size = config.size.max(1);
        Self {
            inner: Arc::new(PoolInner {
                config,
                driver: tokio::sync::OnceCell::new(),
                permits: Arc::new(Semaphore::new(size)),
                idle: Mutex::new(Vec::new()),
                stats: PoolStats::default(),
            }),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    async fn driver_url(&self) -> AdapterResult<String> {
        let cfg = &self.inner.config;
        let d = self
            .inner
            .driver
            .get_or_try_init(|| async {
                if let Some(url) = &cfg.webdriver_url {
                    return Ok(DriverProcess {
                        url: url.trim_end_matches('/').to_owned(),
                        _child: None,
                        group: None,
                        pgid: None,
                    });
                }
                start_chromedriver(&cfg.chromedriver).await
            })
            .await?;
        Ok(d.url.clone())
    }

    async fn new_session(&self) -> AdapterResult<Session> {
        let url = self.driver_url().await?;
        let cfg = &self.inner.config;
        let profile = tempfile::Builder::new()
            .prefix("bulwark-chromium-")
            .tempdir()
            .map_err(|e| transient("cannot create a browser profile directory", e))?;
        let mut caps = ChromeCapabilities::new();
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            "--disable-quic".into(),
            format!("--window-size={},{}", cfg.window.0, cfg.window.1),
        ];
        args.push(format!("--user-data-dir={}", profile.path().display()));
        for a in &args {
            caps.add_arg(a).map_err(|e| transient("capabilities", e))?;
        }
        if let Some(bin) = &cfg.chromium {
            caps.set_binary(&bin.to_string_lossy())
                .map_err(|e| transient("capabilities", e))?;
        }
        // thirtyfour builds its own reqwest client (rustls): it needs the crypto provider.
        crate::transport::install_crypto_provider();
        let driver = WebDriver::new(url, caps)
            .await
            .map_err(|e| transient("cannot start a browser session", e))?;
        let _ = driver
            .set_window_rect(0, 0, cfg.window.0, cfg.window.1)
            .await;
        self.inner.stats.started.fetch_add(1, Ordering::Relaxed);
        Ok(Session {
            driver,
            logged_in: Vec::new(),
            uses: 0,
            _profile: profile,
            secret_fields: Vec::new(),
        })
    }

    /// Borrow a session, preferring one already logged in to `portal`.
    pub(crate) async fn acquire(&self, portal: &str) -> AdapterResult<Lease> {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| transient("pool closed", e))?;
        let reused = {
            let mut idle = self.inner.idle.lock().await;
            let pos = idle
                .iter()
                .position(|s| s.logged_in.iter().any(|p| p == portal))
                .or(if idle.is_empty() { None } else { Some(0) });
            pos.map(|i| idle.swap_remove(i))
        };
        let session = match reused {
            Some(s) => {
                self.inner.stats.reused.fetch_add(1, Ordering::Relaxed);
                s
            }
            None => self.new_session().await?,
        };
        Ok(Lease {
            session: Some(session),
            _permit: permit,
            pool: self.inner.clone(),
        })
    }

    /// Give a session back: kept for reuse if `healthy` and not worn out, quit otherwise.
    pub(crate) async fn release(&self, mut lease: Lease, healthy: bool) {
        let Some(mut s) = lease.session.take() else {
            return;
        };
        s.uses += 1;
        if healthy && s.uses < self.inner.config.max_uses {
            self.inner.idle.lock().await.push(s);
        } else {
            let _ = s.driver.quit().await;
            self.inner.stats.quit.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Quit every idle browser. Call before dropping the pool (chromedriver itself stops
    /// when the last handle to the pool is dropped).
    pub async fn shutdown(&self) {
        let sessions: Vec<Session> = std::mem::take(&mut *self.inner.idle.lock().await);
        for s in sessions {
            let _ = s.driver.quit().await;
            self.inner.stats.quit.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let sessions = std::mem::take(self.idle.get_mut());
        if !sessions.is_empty() {
            // The last handle went away without `shutdown()` (the CLI drops its adapter
            // registry at exit): quit the browsers properly, off the executor, before
            // chromedriver (dropped with `self`) is killed.
            let n = sessions.len() as u64;
            let _ = std::thread::spawn(move || quit_off_executor(sessions)).join();
            self.stats.quit.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Longest wait for one browser to quit when the pool goes away.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Quit `sessions` with `WebDriver::quit` on a runtime of this thread's own (call it on a
/// thread without a runtime). thirtyfour's fallback for a dropped, un-quit session does
/// the same request but warns about it ("WebDriver was not quit properly"); a session
/// whose quit fails or times out is left to that fallback.
fn quit_off_executor(sessions: Vec<Session>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "cannot quit browser sessions cleanly");
            drop(sessions);
            return;
        }
    };
    rt.block_on(async move {
        let quits = sessions.into_iter().map(|s| async move {
            let Session {
                driver, _profile, ..
            } = s;
            // The profile directory goes once its browser is gone.
            tokio::time::timeout(QUIT_TIMEOUT, driver.quit()).await
        });
        for r in futures::future::join_all(quits).await {
            if !matches!(r, Ok(Ok(()))) {
                tracing::debug!("a browser session did not quit cleanly");
            }
        }
    });
}

async fn start_chromedriver(bin: &PathBuf) -> AdapterResult<DriverProcess> {
    if !bin.exists() {
        return Err(AdapterError::Config(format!(
            "chromedriver not found at {} (install Debian's `chromium chromium-driver`, set \
             BULWARK_CHROMEDRIVER, or give a WebDriver URL)",
            bin.display()
        )));
    }
    let reaped = super::reaper::reap_leftovers();
    if reaped > 0 {
        tracing::info!(
            reaped,
            "chromedriver groups left by killed processes were stopped"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| transient("no free port for chromedriver", e))?
        .port();
    let child = tokio::process::Command::new(bin)
        // A group of its own: chromedriver and its browsers are stopped together, and
        // found again by the next start if this process is killed.
        .process_group(0)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| transient("cannot start chromedriver", e))?;
    let pgid = child.id();
    let group = match pgid.map(super::reaper::register) {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot record chromedriver's process group; after a kill -9 its browsers may outlive this process");
            None
        }
        None => None,
    };
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(transient(
                "chromedriver did not listen within 20 s",
                bin.display(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::debug!(port, "chromedriver started");
    Ok(DriverProcess {
        url: format!("http://127.0.0.1:{port}"),
        _child: Some(child),
        group,
        pgid,
    })
}
