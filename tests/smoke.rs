mod support;

use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_echo_through_the_proxy() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/echo")).await;
    futures_util::SinkExt::send(&mut ws, Message::text("hello"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
}
