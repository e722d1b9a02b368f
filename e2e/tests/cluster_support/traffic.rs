//! A steady stream of chat requests through the agents, counting what is
//! answered and recording what fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::task::JoinHandle;

use super::chat;

/// Clients asking one Model, one request after another each.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// One client per agent URL, each sending short chats for `model`
    /// until stopped.
    pub fn start(urls: &[String], model: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let clients = urls
            .iter()
            .map(|url| {
                let (url, model) = (url.clone(), model.to_owned());
                let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let (status, _) = chat(&url, &model, &format!("steady {i}"), 4).await;
                        if status == 200 {
                            answered.fetch_add(1, Ordering::SeqCst);
                        } else {
                            let at = started.elapsed().as_secs_f64();
                            let failure = format!("{url}: status {status} at {at:.1} s");
                            failures.lock().unwrap().push(failure);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            failures,
            clients,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Stops the clients once their requests in flight are done; the
    /// number answered and the failures (agent, status, when).
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.await.expect("a traffic client");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.answered.load(Ordering::SeqCst), failures)
    }
}
