-- The server name a relay's TLS ClientHello carries (issue 13, link parameter `sni=`):
-- NULL = the relay's host when it is a name (the default), '' = none, otherwise the name.
ALTER TABLE proxies ADD COLUMN sni TEXT;
