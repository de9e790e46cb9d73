//! The operator's port: `GET /metrics` (Prometheus text exposition 0.0.4) and `GET /healthz`
//! (200 while the worker reads and commits, 503 before and while it shuts down), for ECS
//! health checks and a Prometheus scraper or the CloudWatch agent.
//!
//! Two fixed answers over HTTP/1.1 need no web framework: each connection gets one answer
//! and is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Binds `addr` and serves until the process ends. Binding errors are returned (a port in
/// use must stop the start, not be found later by a failing health check).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let m = metrics.clone();
                    tokio::spawn(async move {
                        // A client that sends nothing is dropped after a while.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), answer(conn, &m)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection on the metrics port failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

async fn answer(mut conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => match metrics.unhealthy() {
            None => ("200 OK", "text/plain; charset=utf-8", "ready\n".into()),
            Some(why) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "GET /metrics or /healthz\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}
