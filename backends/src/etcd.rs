//! [`MetaStore`] over etcd through `etcd-client`.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use rialto_security::tls::ClientTlsFiles;
use tokio::sync::watch;

use crate::meta::{KeyValue, LeaseHandle, MetaError, MetaStore, WatchEvent, WatchStream};

/// etcd-backed [`MetaStore`]. Cheap to clone: clients share one channel.
#[derive(Clone)]
pub struct EtcdMetaStore {
    client: Client,
}

fn err(context: &str, e: etcd_client::Error) -> MetaError {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            MetaError::Unavailable {
                context: context.to_string(),
                detail: e.to_string(),
            }
        }
        etcd_client::Error::GRpcStatus(ref s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            MetaError::Unavailable {
                context: context.to_string(),
                detail: e.to_string(),
            }
        }
        _ => MetaError::Failed {
            context: context.to_string(),
            detail: e.to_string(),
        },
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
    }
}

impl EtcdMetaStore {
    /// Connects to etcd (`http://host:port` endpoints), failing after `timeout` if none answers.
    pub async fn connect(
        endpoints: &[String],
        timeout: Duration,
    ) -> Result<EtcdMetaStore, MetaError> {
        Self::connect_tls(endpoints, timeout, None).await
    }

    /// Like [`connect`](Self::connect), over TLS when `tls` is given (`https://` endpoints):
    /// etcd's certificate is checked against `tls.ca`, and `tls.identity` is presented to an
    /// etcd that requires client certificates.
    pub async fn connect_tls(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<&ClientTlsFiles>,
    ) -> Result<EtcdMetaStore, MetaError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        match tls {
            Some(files) => {
                let read = |path: &std::path::Path| {
                    rialto_security::tls::read(path).map_err(|e| MetaError::Failed {
                        context: "etcd TLS settings".into(),
                        detail: e.to_string(),
                    })
                };
                let mut options = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&files.ca)?));
                if let Some((cert, key)) = &files.identity {
                    options =
                        options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
                }
                opts = opts.with_tls(options);
            }
            None if endpoints.iter().any(|e| !e.starts_with("https://")) => {
                rialto_security::tls::warn_plaintext(
                    "the connection to etcd",
                    "give --etcd-ca-cert (and --etcd-cert/--etcd-key) and https:// endpoints",
                );
            }
            None => {}
        }
        let connect = Client::connect(endpoints, Some(opts));
        let client = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| MetaError::Unavailable {
                context: format!("connect to etcd at {}", endpoints.join(",")),
                detail: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| err(&format!("connect to etcd at {}", endpoints.join(",")), e))?;
        let store = EtcdMetaStore { client };
        // Connecting is lazy in tonic; prove the cluster answers before returning.
        store.get("/rialto-connect-probe").await?;
        Ok(store)
    }
}

struct EtcdWatch {
    _watcher: etcd_client::Watcher,
    stream: etcd_client::WatchStream,
    prefix: String,
}

#[async_trait]
impl WatchStream for EtcdWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        let resp = match self.stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(err(&format!("watch {}", self.prefix), e)),
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(MetaError::WatchEnded(self.prefix.clone()));
        }
        let events = resp
            .events()
            .iter()
            .filter_map(|e| {
                let k = e.kv()?;
                Some(match e.event_type() {
                    EventType::Put => WatchEvent::Put(kv(k)),
                    EventType::Delete => WatchEvent::Delete {
                        key: String::from_utf8_lossy(k.key()).into_owned(),
                        mod_revision: k.mod_revision(),
                    },
                })
            })
            .collect();
        Ok(Some(events))
    }
}

#[async_trait]
impl MetaStore for EtcdMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|e| err(&format!("get {key}"), e))?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| err(&format!("list {prefix}"), e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.kvs().iter().map(kv).collect(), revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.client
            .clone()
            .put(key, value, opts)
            .await
            .map_err(|e| err(&format!("put {key}"), e))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.client
            .clone()
            .delete(key, None)
            .await
            .map_err(|e| err(&format!("delete {key}"), e))?;
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        self.client
            .clone()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(|e| err(&format!("delete prefix {prefix}"), e))?;
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        let compare = match expected {
            None => Compare::create_revision(key, CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        };
        let put = TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)));
        let txn = Txn::new().when(vec![compare]).and_then(vec![put]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| err(&format!("compare-and-put {key}"), e))?;
        Ok(resp.succeeded())
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        let (watcher, stream) = self
            .client
            .clone()
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| err(&format!("watch {prefix}"), e))?;
        Ok(Box::new(EtcdWatch {
            _watcher: watcher,
            stream,
            prefix: prefix.to_string(),
        }))
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        let mut client = self.client.clone();
        let granted = client
            .lease_grant(ttl_s, None)
            .await
            .map_err(|e| err("grant lease", e))?;
        let id = granted.id();
        let (mut keeper, mut responses) = client
            .lease_keep_alive(id)
            .await
            .map_err(|e| err("keep lease alive", e))?;
        let (lost_tx, lost) = watch::channel(false);
        let interval = Duration::from_millis((ttl_s.max(1) as u64 * 1000) / 3);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match responses.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    _ => break,
                }
            }
            tracing::warn!(lease = id, "etcd lease lost");
            let _ = lost_tx.send(true);
        });
        Ok(LeaseHandle { id, lost, task })
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        self.client
            .clone()
            .lease_revoke(id)
            .await
            .map_err(|e| err("revoke lease", e))?;
        Ok(())
    }
}
