-- Relay secrets (issue 12): a relay with a secret answers only clients that prove they hold
-- its link (`secret=`), and shows everyone else a web site.
ALTER TABLE proxies ADD COLUMN secret TEXT;
