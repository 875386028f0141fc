//! File and directory transfers through the agent.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_vm::VmError;

use crate::agent;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn a_directory_tree_round_trips_with_modes() {
    let agent = agent().await;
    let host = tempfile::tempdir().expect("tempdir");
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).expect("mkdir");
    std::fs::write(src.join("plain.txt"), "hello\n").expect("write");
    std::fs::write(src.join("sub/run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    std::fs::write(src.join("sub/deeper/secret"), "s").expect("write");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big.bin"), &big).expect("write");
    std::os::unix::fs::symlink("sub/run.sh", src.join("link")).expect("symlink");
    for (path, bits) in [
        ("plain.txt", 0o640),
        ("sub/run.sh", 0o755),
        ("sub/deeper/secret", 0o600),
        ("sub/deeper", 0o700),
    ] {
        std::fs::set_permissions(src.join(path), std::fs::Permissions::from_mode(bits))
            .expect("chmod");
    }

    // The agent runs on this host, so "guest" paths are host paths in another directory.
    let guest_dir = host.path().join("guest/workspace");
    let guest = guest_dir.to_string_lossy().into_owned();
    agent.client.copy_in(&src, &guest).await.expect("copy in");
    let back = host.path().join("back");
    agent
        .client
        .copy_out(&guest, &back)
        .await
        .expect("copy out");

    for dir in [&guest_dir, &back] {
        assert_eq!(
            std::fs::read_to_string(dir.join("plain.txt")).expect("read"),
            "hello\n"
        );
        assert_eq!(std::fs::read(dir.join("big.bin")).expect("read"), big);
        assert_eq!(mode(&dir.join("plain.txt")), 0o640);
        assert_eq!(mode(&dir.join("sub/run.sh")), 0o755);
        assert_eq!(mode(&dir.join("sub/deeper/secret")), 0o600);
        assert_eq!(mode(&dir.join("sub/deeper")), 0o700);
        assert_eq!(
            std::fs::read_link(dir.join("link")).expect("symlink kept"),
            Path::new("sub/run.sh")
        );
    }
}

#[tokio::test]
async fn single_files_round_trip_with_their_mode() {
    let agent = agent().await;
    let host = tempfile::tempdir().expect("tempdir");
    let src = host.path().join("tool");
    std::fs::write(&src, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o751)).expect("chmod");
    let guest = host
        .path()
        .join("guest/a/b/tool")
        .to_string_lossy()
        .into_owned();
    agent.client.copy_in(&src, &guest).await.expect("copy in");
    let back = host.path().join("out/tool");
    agent
        .client
        .copy_out(&guest, &back)
        .await
        .expect("copy out");
    assert_eq!(std::fs::read_to_string(&back).expect("read"), "#!/bin/sh\n");
    assert_eq!(mode(&back), 0o751);
    assert_eq!(mode(Path::new(&guest)), 0o751);
}

#[tokio::test]
async fn write_file_and_read_file_round_trip() {
    let agent = agent().await;
    let host = tempfile::tempdir().expect("tempdir");
    let guest = host
        .path()
        .join("new/dir/file.bin")
        .to_string_lossy()
        .into_owned();
    let contents: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    agent
        .client
        .write_file(&guest, &contents)
        .await
        .expect("write");
    assert_eq!(
        agent.client.read_file(&guest).await.expect("read"),
        contents
    );
    agent
        .client
        .write_file(&guest, b"")
        .await
        .expect("truncate");
    assert_eq!(agent.client.read_file(&guest).await.expect("read"), b"");
}

#[tokio::test]
async fn transfer_errors_are_reported_and_the_connection_survives() {
    let agent = agent().await;
    let err = agent
        .client
        .read_file("/nonexistent/kiln/file")
        .await
        .expect_err("missing");
    assert!(
        matches!(&err, VmError::Guest { message, .. } if message.contains("/nonexistent/kiln/file")),
        "{err}"
    );
    let err = agent
        .client
        .read_file("relative/path")
        .await
        .expect_err("relative");
    assert!(err.to_string().contains("absolute"), "{err}");
    let host = tempfile::tempdir().expect("tempdir");
    let err = agent
        .client
        .copy_out("/nonexistent/kiln/dir", &host.path().join("x"))
        .await
        .expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/kiln/dir"), "{err}");
    // Writing below a regular file fails in the guest.
    let file = host.path().join("f");
    std::fs::write(&file, "x").expect("write");
    let below = file.join("child").to_string_lossy().into_owned();
    let big = vec![0u8; 1 << 20];
    let err = agent
        .client
        .write_file(&below, &big)
        .await
        .expect_err("not a dir");
    assert!(err.to_string().contains("child"), "{err}");
    agent.client.ping().await.expect("still connected");
}
