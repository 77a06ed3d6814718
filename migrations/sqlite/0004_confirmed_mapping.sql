-- What an endpoint confirmed is only a valid diff base under the same mapping: remember it.
ALTER TABLE endpoint_confirmed ADD COLUMN mapping_key TEXT;
