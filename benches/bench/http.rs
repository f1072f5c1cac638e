//! A keep-alive HTTP/1.1 client (hyper), one connection per client task.

use crate::*;

pub(crate) struct Http {
    pub(crate) tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Http {
    pub(crate) async fn connect(addr: SocketAddr) -> Res<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { tx })
    }

    pub(crate) async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Res<Response<hyper::body::Incoming>> {
        self.tx.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "127.0.0.1");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        Ok(self.tx.send_request(req).await?)
    }

    pub(crate) async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Res<(StatusCode, Bytes)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    pub(crate) async fn get(&mut self, path: &str) -> Res<(StatusCode, Bytes)> {
        self.call(Method::GET, path, None).await
    }

    pub(crate) async fn expect_ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Res<Bytes> {
        let (status, bytes) = self.call(method.clone(), path, body).await?;
        if status != StatusCode::OK {
            return Err(format!(
                "{method} {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        Ok(bytes)
    }

    /// `POST /processes`; the id from the 201.
    pub(crate) async fn create(&mut self, body: Bytes) -> Res<u64> {
        let (status, bytes) = self.call(Method::POST, "/processes", Some(body)).await?;
        if status != StatusCode::CREATED {
            return Err(format!(
                "POST /processes: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        Ok(serde_json::from_slice::<Created>(&bytes)?.id)
    }

    /// `POST /processes` that waits and retries while the daemon answers
    /// 429 because its start queue is full (`max_queued`): how a client
    /// submitting more runs than the daemon starts keeps going.
    pub(crate) async fn create_queued(&mut self, body: Bytes) -> Res<u64> {
        loop {
            let (status, bytes) = self
                .call(Method::POST, "/processes", Some(body.clone()))
                .await?;
            match status {
                StatusCode::CREATED => return Ok(serde_json::from_slice::<Created>(&bytes)?.id),
                StatusCode::TOO_MANY_REQUESTS => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    return Err(format!(
                        "POST /processes: {status} {}",
                        String::from_utf8_lossy(&bytes)
                    )
                    .into())
                }
            }
        }
    }

    pub(crate) async fn kill(&mut self, id: u64) -> Res<()> {
        self.expect_ok(
            Method::POST,
            &format!("/processes/{id}/signals/kill"),
            Some(Bytes::from_static(b"{}")),
        )
        .await
        .map(|_| ())
    }
}

/// Opens `n` client connections.
pub(crate) async fn connect_many(addr: SocketAddr, n: usize) -> Vec<Http> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Http::connect(addr).await.expect("connect"));
    }
    out
}
