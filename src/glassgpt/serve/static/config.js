// Where the pages send their API requests ('' = the server that serves the pages).
// `glassgpt site DIR --api URL` rewrites this file in its static copy.
window.GLASSGPT_API = "";
