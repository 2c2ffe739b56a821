//! `wsgate demo`: an embedded backend (a page, a WebSocket echo at `/echo` and a broadcast chat room at `/chat`)
//! that the demo puts behind wsgate, so a person can see the proxy work with nothing else installed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::http::headers::has_token;
use crate::ws::accept_key;

const PAGE: &str = include_str!("page.html");

/// Starts the demo backend on a free loopback port and returns its address. It runs until the runtime stops.
pub async fn start_backend() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let address = listener.local_addr()?;
    let (room, _) = broadcast::channel::<String>(256);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let room = room.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, room.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(address)
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

async fn handle(req: Request<Incoming>, room: broadcast::Sender<String>) -> Result<Response<Full<Bytes>>, Infallible> {
    let wants_websocket = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), "websocket"));
    let path = req.uri().path().to_string();
    Ok(match (path.as_str(), wants_websocket) {
        ("/", false) => response(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        ("/echo" | "/chat", true) => upgrade(req, path == "/chat", room),
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

fn upgrade(mut req: Request<Incoming>, chat: bool, room: broadcast::Sender<String>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return response(StatusCode::BAD_REQUEST, "text/plain", "missing Sec-WebSocket-Key\n");
    };
    let accept = accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if chat {
            chat_member(ws, room).await;
        } else {
            echo(ws).await;
        }
    });
    let mut resp = response(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let headers = resp.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_bytes(&accept) {
        headers.insert("sec-websocket-accept", accept);
    }
    resp
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
}

async fn chat_member<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: WebSocketStream<S>,
    room: broadcast::Sender<String>,
) {
    let mut heard = room.subscribe();
    let (mut tx, mut rx) = ws.split();
    loop {
        tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let _ = room.send(text.to_string());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            said = heard.recv() => match said {
                Ok(text) => {
                    if tx.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}
