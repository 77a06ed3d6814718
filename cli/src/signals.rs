//! SIGINT / SIGTERM: the first asks the running command to wind down (finish the calls in
//! flight, journal them, claim nothing more), then the command exits 130 (SIGINT) or 143
//! (SIGTERM) as shells expect; a second signal exits at once. Work left unfinished is in
//! the journal either way: the next `bulwark sync` (or another worker) resumes it.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

/// Which signal arrived (0: none yet).
#[derive(Debug, Clone, Default)]
pub(crate) struct Interrupt(Arc<AtomicI32>);

impl Interrupt {
    /// Listen for SIGINT and SIGTERM; on the first, print what happens and call `stop`.
    pub(crate) fn listen(what: &'static str, stop: impl Fn() + Send + 'static) -> Self {
        let got = Self::default();
        let flag = got.0.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::warn!("cannot listen for SIGINT/SIGTERM; they end the process at once");
                return;
            };
            let next = async |int: &mut tokio::signal::unix::Signal,
                              term: &mut tokio::signal::unix::Signal| {
                tokio::select! {
                    _ = int.recv() => (libc_sigint(), "SIGINT"),
                    _ = term.recv() => (libc_sigterm(), "SIGTERM"),
                }
            };
            let (n, name) = next(&mut int, &mut term).await;
            flag.store(n, Ordering::SeqCst);
            eprintln!(
                "{name}: stopping {what}: finishing the calls in flight, starting nothing new (unfinished work resumes with the next sync); {name} again to exit at once"
            );
            stop();
            let (n2, name2) = next(&mut int, &mut term).await;
            eprintln!("{name2} again: exiting now; the journal has everything done so far");
            std::process::exit(128 + n2);
        });
        got
    }

    /// Resolves once a signal arrived.
    pub(crate) async fn signalled(&self) {
        while self.0.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// 130 / 143 if a signal asked the command to stop.
    pub(crate) fn exit_code(&self) -> Option<ExitCode> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            n => Some(ExitCode::from(u8::try_from(128 + n).unwrap_or(1))),
        }
    }
}

const fn libc_sigint() -> i32 {
    2
}

const fn libc_sigterm() -> i32 {
    15
}

/// Resolves at the first SIGTERM or SIGINT (for simulators, which just stop).
pub(crate) async fn terminated() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
