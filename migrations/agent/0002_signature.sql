-- The owning site's signature of a staged version, kept so a child site can relay it.
ALTER TABLE staged ADD COLUMN signature TEXT;
