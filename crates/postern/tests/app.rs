//! The app (`postern app`) in a real browser: headless Chromium driven over WebDriver,
//! against a real server and relay on loopback. Each test is what a person does:
//! onboarding through a proxy when the service is blocked, two people chatting with the
//! ticks updating live, and the Proxy screen's green tick and red cross.
//!
//! `POSTERN_APP_SCREENSHOTS=docs/app cargo test -p postern --test app` also saves the
//! screenshots the README and docs/app.md show.

#[path = "support/browser.rs"]
mod browser;
mod common;

use browser::{AppProcess, Browser};
use common::*;

/// A proxy link to the relay's TLS listener, as `postern relay link` prints it.
fn tls_link(relay: &TestRelay) -> String {
    let addr = relay.addr("tls");
    format!(
        "postern://proxy?host={}&port={}&tls=1",
        addr.ip(),
        addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_through_a_proxy_when_the_direct_address_is_dead() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    // The network file a censored user has: its direct address is blocked (nothing
    // answers there), the key is the real server's.
    let network = tmp.path().join("network.toml");
    network_file_via(&server.data, closed_port(), &network);

    let home = tmp.path().join("dana");
    let app = AppProcess::start(&home);
    let b = Browser::start().await;
    b.client.goto(&app.url).await.unwrap();
    b.find("[data-test=onboarding]").await;
    // The token was traded for a cookie: it is gone from the address bar.
    let url = b.client.current_url().await.unwrap();
    assert!(!url.as_str().contains("token"), "{url}");

    b.type_into("[data-test=network-path]", network.to_str().unwrap())
        .await;
    b.type_into("[data-test=username]", "Dana").await;
    b.click("[data-test=create-account]").await;
    let error = b
        .text_until("[data-test=onboarding-error]", |t| !t.is_empty())
        .await;
    assert!(error.contains("username"), "{error}");

    b.type_into("[data-test=username]", "dana").await;
    b.click("[data-test=create-account]").await;
    // Direct is dead: the error names the stage that failed, and the proxy box opens.
    let error = b
        .text_until("[data-test=onboarding-error]", |t| {
            t.contains("Could not reach the service")
        })
        .await;
    assert!(error.contains("Connect (TCP)"), "{error}");
    assert!(error.contains("refused"), "{error}");
    b.screenshot("onboarding-blocked").await;

    b.type_into("[data-test=onboarding-proxy]", &tls_link(&relay))
        .await;
    b.click("[data-test=create-account]").await;
    let banner = b
        .text_until("[data-test=banner-text]", |t| t.starts_with("Connected"))
        .await;
    let relay_addr = relay.addr("tls").to_string();
    assert_eq!(banner, format!("Connected via relay {relay_addr} (TLS)"));
    assert_eq!(b.find("[data-test=me]").await.text().await.unwrap(), "dana");
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_and_the_ticks_update_live() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice_home, bob_home) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice_home, "alice", &server);
    account(&bob_home, "bob", &server);
    let (alice_app, bob_app) = (AppProcess::start(&alice_home), AppProcess::start(&bob_home));
    let (alice, bob) = tokio::join!(Browser::start(), Browser::start());
    alice.client.goto(&alice_app.url).await.unwrap();
    bob.client.goto(&bob_app.url).await.unwrap();
    for b in [&alice, &bob] {
        b.text_until("[data-test=banner-text]", |t| t == "Connected directly")
            .await;
    }

    alice.click("[data-test=new-chat]").await;
    alice.type_into("[data-test=new-chat-name]", "bob\n").await;
    alice.type_into("[data-test=compose]", "hello bob\n").await;
    // It shows at once (pending or already sent), then ✓✓ once bob's app has stored it.
    alice.find("[data-test=message][data-status]").await;
    // Found afresh on each try: the chat may re-render between finding and reading.
    alice
        .text_until(
            "[data-test=message][data-status=delivered] [data-test=marks]",
            |t| t == "✓✓",
        )
        .await;

    // Bob's chat list shows the new message, unread.
    let unread = bob.text_until("[data-test=unread]", |t| t == "1").await;
    assert_eq!(unread, "1");
    let preview = bob
        .text_until("[data-test=chat]", |t| t.contains("hello bob"))
        .await;
    assert!(preview.contains("alice"), "{preview}");
    bob.screenshot("chats-unread").await;
    bob.click("[data-test=chat][data-peer=alice]").await;
    bob.text_until("[data-test=message-text]", |t| t == "hello bob")
        .await;
    bob.type_into("[data-test=compose]", "hi alice!\n").await;
    // Opening the chat read it: no unread badge any more.
    let deadline = std::time::Instant::now() + browser::UI_TIMEOUT;
    while bob
        .client
        .find(fantoccini::Locator::Css("[data-test=unread]"))
        .await
        .is_ok()
    {
        assert!(std::time::Instant::now() < deadline, "still unread");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Alice sees the reply arrive without reloading.
    alice
        .text_until("[data-test=messages]", |t| t.contains("hi alice!"))
        .await;
    bob.until_exists("[data-test=message][data-status=delivered]")
        .await;
    alice.screenshot("conversation").await;

    // A message to nobody is kept, marked failed with the reason.
    alice.click("[data-test=new-chat]").await;
    alice
        .type_into("[data-test=new-chat-name]", "nobody\n")
        .await;
    alice
        .type_into("[data-test=compose]", "anyone there?\n")
        .await;
    let reason = alice
        .text_until("[data-test=failure]", |t| !t.is_empty())
        .await;
    assert!(reason.contains("no user named"), "{reason}");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_typed_offline_show_as_pending_and_go_out_later() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    // The path to the server goes through a forwarder we can cut.
    let path = Forwarder::start(server.addr, Tamper::None);
    let network = tmp.path().join("network.toml");
    network_file_via(&server.data, path.addr, &network);
    let (alice_home, bob_home) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(
        &alice_home,
        &[
            "account",
            "create",
            "alice",
            "--network",
            network.to_str().unwrap(),
        ],
    );
    account(&bob_home, "bob", &server);

    path.set_tamper(Tamper::Drop);
    let app = AppProcess::start(&alice_home);
    let b = Browser::start().await;
    b.client.goto(&app.url).await.unwrap();
    // The banner says so (between retries; while a retry races it says "Connecting…").
    b.text_until("[data-test=banner-text]", |t| {
        t.starts_with("Not connected")
    })
    .await;
    b.find("[data-test=banner-proxy-settings]").await;
    b.screenshot("offline").await;

    b.click("[data-test=new-chat]").await;
    b.type_into("[data-test=new-chat-name]", "bob\n").await;
    b.type_into("[data-test=compose]", "written offline\n")
        .await;
    // Found afresh on each try: the chat may re-render between finding and reading.
    b.text_until("[data-test=message][data-status=pending]", |t| {
        t.lines().next() == Some("written offline")
    })
    .await;

    path.set_tamper(Tamper::None);
    b.text_until("[data-test=banner-text]", |t| t == "Connected directly")
        .await;
    b.until_exists("[data-test=message][data-status=sent]")
        .await;
    let inbox = ok(&bob_home, &["inbox"]);
    assert!(inbox.contains("written offline"), "{inbox}");
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_screen_shows_a_green_tick_or_the_stage_that_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let home = tmp.path().join("alice");
    account(&home, "alice", &server);
    let app = AppProcess::start(&home);
    let b = Browser::start().await;
    b.client.goto(&app.url).await.unwrap();
    b.text_until("[data-test=banner-text]", |t| t == "Connected directly")
        .await;
    b.click("[data-test=settings]").await;
    b.click("[data-test=settings-proxy]").await;
    b.text_until("[data-test=crumbs]", |t| {
        t == "Settings → Storage and data → Proxy"
    })
    .await;

    // A link pasted and saved: checked live, stage by stage, ending in the green tick.
    let link = tls_link(&relay);
    b.type_into("[data-test=proxy-address]", &link).await;
    b.click("[data-test=proxy-save]").await;
    b.find("[data-test=green-tick]").await;
    for stage in ["resolve", "connect", "tls", "handshake"] {
        let row = b
            .find(&format!("[data-test=stage][data-stage={stage}]"))
            .await;
        assert_eq!(
            row.attr("data-result").await.unwrap().as_deref(),
            Some("ok")
        );
    }
    let saved = b
        .text_until("[data-test=proxy-list]", |t| t.contains("TLS"))
        .await;
    assert!(saved.contains(&relay.addr("tls").to_string()), "{saved}");
    b.click("[data-test=proxy-qr]").await;
    let shared = b.find("[data-test=proxy-link]").await.text().await.unwrap();
    assert_eq!(shared, link);
    b.screenshot("proxy-green-tick").await;

    // A dead address: the red cross, with the stage and the advice.
    let dead = closed_port();
    b.type_into("[data-test=proxy-address]", &dead.to_string())
        .await;
    b.click("[data-test=proxy-save]").await;
    b.find("[data-test=red-cross]").await;
    let verdict = b.find("[data-test=verdict]").await.text().await.unwrap();
    assert!(verdict.contains("Connect (TCP)"), "{verdict}");
    assert!(verdict.contains("try another proxy address"), "{verdict}");
    let failed = b.find("[data-test=stage][data-stage=connect]").await;
    assert_eq!(
        failed.attr("data-result").await.unwrap().as_deref(),
        Some("bad")
    );
    b.screenshot("proxy-red-cross").await;

    // "Use proxy": relays only. The connection moves to the relay.
    b.click("[data-test=mode-on]").await;
    b.text_until("[data-test=banner-text]", |t| {
        t.starts_with("Connected via relay")
    })
    .await;
    let mode = ok(&home, &["proxy", "list"]);
    assert!(mode.contains("on"), "{mode}");
    b.close().await;
}

#[tokio::test]
async fn a_changed_safety_number_is_marked_in_the_chat_and_can_be_verified_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice_home, bob_home) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice_home, "alice", &server);
    account(&bob_home, "bob", &server);
    ok(&alice_home, &["send", "bob", "hello bob"]);
    assert!(ok(&bob_home, &["inbox"]).contains("hello bob"));
    // Bob registers his name again with new keys, and writes from there.
    let _server = replace_account(server, &bob_home, "bob");
    ok(&bob_home, &["send", "alice", "new phone, same bob"]);

    let alice_app = AppProcess::start(&alice_home);
    let alice = Browser::start().await;
    alice.client.goto(&alice_app.url).await.unwrap();
    alice
        .text_until("[data-test=chat][data-peer=bob]", |t| {
            t.contains("new phone, same bob")
        })
        .await;
    alice.click("[data-test=chat][data-peer=bob]").await;
    let marker = alice
        .text_until("[data-test=key-changed]", |t| !t.is_empty())
        .await;
    assert!(
        marker.contains("bob's safety number changed (new identity key)"),
        "{marker}"
    );
    let messages = alice
        .text_until("[data-test=messages]", |t| t.contains("new phone"))
        .await;
    let (at_marker, at_message) = (
        messages.find("safety number changed").unwrap(),
        messages.find("new phone").unwrap(),
    );
    assert!(at_marker < at_message, "{messages}");

    // The number in the app is the one both sides compute.
    alice.click("[data-test=safety-button]").await;
    let shown = alice
        .text_until("[data-test=safety-number]", |t| !t.is_empty())
        .await;
    let bobs: serde_json::Value =
        serde_json::from_str(&ok(&bob_home, &["contact", "verify", "alice", "--json"])).unwrap();
    let digits: String = shown.chars().filter(char::is_ascii_digit).collect();
    assert_eq!(digits, bobs["number"].as_str().unwrap());
    let status = alice
        .text_until("[data-test=safety-status]", |t| !t.is_empty())
        .await;
    assert!(status.contains("changed"), "{status}");
    alice.screenshot("safety-number").await;
    alice.click("[data-test=safety-confirm]").await;
    alice
        .text_until("[data-test=safety-status]", |t| t.contains("✓ Verified"))
        .await;
    let verified = ok(&alice_home, &["contact", "verify", "bob", "--json"]);
    assert!(verified.contains("\"verified\":true"), "{verified}");
    alice.close().await;
}

/// A 2×2 PNG (red, green, blue, white), small enough to write out here.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd, 0xd4, 0x9a,
    0x73, 0x00, 0x00, 0x00, 0x16, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xc0,
    0xf0, 0x9f, 0x01, 0x0c, 0x18, 0xfe, 0xff, 0xff, 0x0f, 0x00, 0x2f, 0xf2, 0x05, 0xfe, 0x59, 0x7e,
    0x1b, 0x39, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_sent_from_the_app_shows_in_the_other_persons_app() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice_home, bob_home) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice_home, "alice", &server);
    account(&bob_home, "bob", &server);
    let picture = tmp.path().join("sunset.png");
    std::fs::write(&picture, PNG).unwrap();
    let (alice_app, bob_app) = (AppProcess::start(&alice_home), AppProcess::start(&bob_home));
    let (alice, bob) = tokio::join!(Browser::start(), Browser::start());
    alice.client.goto(&alice_app.url).await.unwrap();
    bob.client.goto(&bob_app.url).await.unwrap();
    for b in [&alice, &bob] {
        b.text_until("[data-test=banner-text]", |t| t == "Connected directly")
            .await;
    }

    alice.click("[data-test=new-chat]").await;
    alice.type_into("[data-test=new-chat-name]", "bob\n").await;
    // What is typed becomes the caption; the picker takes the file.
    alice
        .type_into("[data-test=compose]", "from the pier")
        .await;
    alice
        .find("[data-test=file-input]")
        .await
        .send_keys(picture.to_str().unwrap())
        .await
        .expect("choose the file");
    alice
        .text_until(
            "[data-test=message][data-status=delivered] [data-test=marks]",
            |t| t == "✓✓",
        )
        .await;
    // The sender's own copy shows as a picture at once.
    alice
        .until_exists("[data-test=message] [data-test=attachment-image]")
        .await;

    bob.click("[data-test=chat][data-peer=alice]").await;
    bob.text_until("[data-test=message-text]", |t| t == "from the pier")
        .await;
    // Fetched in the background, checked, decrypted: then shown as the picture it is.
    bob.until_exists("[data-test=attachment][data-state=done] [data-test=attachment-image]")
        .await;
    let deadline = std::time::Instant::now() + browser::UI_TIMEOUT;
    loop {
        let width = bob
            .client
            .execute(
                "return document.querySelector('[data-test=attachment-image]').naturalWidth",
                vec![],
            )
            .await
            .unwrap();
        if width.as_u64() == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the picture never rendered: {width}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bob.screenshot("attachment").await;
    let saved = bob_home.join("files").join("sunset.png");
    assert_eq!(std::fs::read(saved).unwrap(), PNG);

    // A web page someone sends is never opened in the app's own origin: it is offered as
    // a download, sandboxed, whatever type the sender claimed.
    let page = tmp.path().join("page.html");
    std::fs::write(&page, "<script>fetch('/api/chats')</script>").unwrap();
    alice
        .find("[data-test=file-input]")
        .await
        .send_keys(page.to_str().unwrap())
        .await
        .expect("choose the file");
    bob.text_until(
        "[data-test=message]:last-child [data-test=attachment][data-state=done]",
        |t| t.contains("page.html"),
    )
    .await;
    let headers = bob
        .client
        .execute_async(
            "const done = arguments[0];
             const link = [...document.querySelectorAll('[data-test=attachment-link]')]
               .find(a => a.textContent === 'page.html');
             fetch(link.href).then(r => done(
               [r.headers.get('content-type'), r.headers.get('content-disposition'),
                r.headers.get('content-security-policy')].join(' | ')));",
            vec![],
        )
        .await
        .unwrap();
    let headers = headers.as_str().unwrap_or_default().to_string();
    assert!(
        headers.starts_with(
            "application/octet-stream | attachment; filename*=UTF-8''page.html | sandbox"
        ),
        "{headers}"
    );

    // A text typed while a large file uploads goes out at once, not behind the file.
    let big = tmp.path().join("film.mkv");
    std::fs::write(&big, vec![7u8; 16 * 1024 * 1024]).unwrap();
    alice
        .find("[data-test=file-input]")
        .await
        .send_keys(big.to_str().unwrap())
        .await
        .expect("choose the file");
    alice
        .text_until("[data-test=messages]", |t| t.contains("Uploading…"))
        .await;
    alice
        .type_into("[data-test=compose]", "the film is on its way\n")
        .await;
    let deadline = std::time::Instant::now() + browser::UI_TIMEOUT;
    let states = loop {
        let states = alice
            .client
            .execute(
                "const bubbles = [...document.querySelectorAll('[data-test=message]')];
                 const text = bubbles.find(b => b.textContent.includes('the film is on its way'));
                 const film = bubbles.find(b => b.textContent.includes('film.mkv'));
                 return [text ? text.dataset.status : '', film ? film.dataset.status : ''];",
                vec![],
            )
            .await
            .unwrap();
        let text = states[0].as_str().unwrap_or_default().to_string();
        if text == "sent" || text == "delivered" {
            break states;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the text never went out: {states}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        states[1].as_str(),
        Some("pending"),
        "the text waited for the file upload to finish: {states}"
    );
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shows_like_a_chat_with_who_wrote_what_and_each_members_ticks() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice_home, bob_home, carol_home, dave_home) = (
        tmp.path().join("alice"),
        tmp.path().join("bob"),
        tmp.path().join("carol"),
        tmp.path().join("dave"),
    );
    for (home, name) in [
        (&alice_home, "alice"),
        (&bob_home, "bob"),
        (&carol_home, "carol"),
        (&dave_home, "dave"),
    ] {
        account(home, name, &server);
    }
    let (alice_app, bob_app) = (AppProcess::start(&alice_home), AppProcess::start(&bob_home));
    let (alice, bob) = tokio::join!(Browser::start(), Browser::start());
    alice.client.goto(&alice_app.url).await.unwrap();
    bob.client.goto(&bob_app.url).await.unwrap();
    for b in [&alice, &bob] {
        b.text_until("[data-test=banner-text]", |t| t == "Connected directly")
            .await;
    }

    // Alice makes a group with bob and carol (carol is offline: she uses the CLI later).
    alice.click("[data-test=new-group]").await;
    alice
        .type_into("[data-test=new-group-name]", "book club")
        .await;
    alice
        .type_into("[data-test=new-group-members]", "bob, carol")
        .await;
    alice.click("[data-test=new-group-create]").await;
    alice
        .text_until("[data-test=conversation-peer]", |t| t == "book club")
        .await;
    let members = alice
        .text_until("[data-test=group-members]", |t| !t.is_empty())
        .await;
    assert_eq!(members, "you, bob, carol");
    alice
        .text_until("[data-test=group-event]", |t| {
            t.contains("you created the group “book club” with bob, carol")
        })
        .await;
    alice
        .type_into("[data-test=compose]", "chapter one by friday\n")
        .await;

    // Bob's app lists the group by its name, and shows who wrote the message.
    bob.text_until("[data-test=chat][data-group] [data-test=chat-title]", |t| {
        t == "book club"
    })
    .await;
    bob.text_until("[data-test=chat][data-group]", |t| {
        t.contains("alice: chapter one by friday")
    })
    .await;
    bob.click("[data-test=chat][data-group]").await;
    bob.text_until("[data-test=message-sender]", |t| t == "alice")
        .await;
    bob.text_until("[data-test=message-text]", |t| t == "chapter one by friday")
        .await;

    // Bob has it, carol not yet: ✓✓ 1/2, then ✓✓ once carol's device has it too.
    alice
        .text_until("[data-test=message] [data-test=marks]", |t| t == "✓✓ 1/2")
        .await;
    alice.screenshot("group").await;
    let inbox = ok(&carol_home, &["inbox"]);
    assert!(
        inbox.contains("alice in “book club”: chapter one by friday"),
        "{inbox}"
    );
    alice
        .text_until(
            "[data-test=message][data-status=delivered] [data-test=marks]",
            |t| t == "✓✓",
        )
        .await;

    // Members: alice adds dave from the panel; bob's conversation shows it.
    alice.click("[data-test=members-button]").await;
    alice.type_into("[data-test=group-add-name]", "dave").await;
    alice.click("[data-test=group-add]").await;
    alice
        .text_until("[data-test=group-members]", |t| {
            t == "you, bob, carol, dave"
        })
        .await;
    bob.text_until("[data-test=messages]", |t| t.contains("alice added dave"))
        .await;
    bob.text_until("[data-test=group-members]", |t| t.contains("dave"))
        .await;
    let inbox = ok(&dave_home, &["inbox"]);
    assert!(inbox.contains("alice added you"), "{inbox}");
    alice.close().await;
    bob.close().await;
}
