//! `postern app`: the messenger in the browser (the `postern-app` crate), for one profile.

use std::path::PathBuf;

use postern_app::{App, AppConfig};

use crate::cli::AppArgs;

pub async fn run(home: PathBuf, args: AppArgs) -> anyhow::Result<()> {
    let stop = super::shutdown_signal();
    let app = App::bind(AppConfig {
        home,
        listen: args.listen,
    })
    .await?;
    // Scripts and tests wait for this line; people read the address.
    println!("postern app ready: {}", app.url());
    if args.no_browser {
        println!("Open that address in your browser (it works only on this computer).");
    } else if let Err(e) = webbrowser::open(app.url()) {
        println!("Could not open a browser ({e}): open that address yourself.");
    }
    println!("Press Ctrl-C to stop.");
    app.run_until(stop).await?;
    Ok(())
}
